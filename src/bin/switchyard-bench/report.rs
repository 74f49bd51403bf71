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

/// A target of the issue, and whether a row meets it.
struct Verdict {
    target: String,
    ok: Option<bool>,
}

fn verdict(row: &Row, ratio: Option<f64>) -> Option<Verdict> {
    let eps = row.events_per_sec;
    let p99 = row.p99_ms;
    let (target, ok) = match row.scenario.as_str() {
        "postgres-baseline" => ("(the limit)".to_owned(), None),
        "balancing" => (
            "all-on < p2c < round robin (failed, p99)".to_owned(),
            row.extra
                .get("ordered")
                .and_then(serde_json::Value::as_bool),
        ),
        "ingest-single" => (
            ">= 20,000/s, p99 <= 20 ms".to_owned(),
            Some(eps >= 20_000.0 && p99.is_some_and(|p| p <= 20.0)),
        ),
        "ingest-batch" => (">= 0.50 of COPY".to_owned(), ratio.map(|r| r >= 0.5)),
        "deliver-e2e" => (
            ">= 10,000/s, p99 <= 100 ms @2k/s".to_owned(),
            Some(eps >= 10_000.0 && p99.is_some_and(|p| p <= 100.0)),
        ),
        "deliver-batched" => (">= 30,000/s".to_owned(), Some(eps >= 30_000.0)),
        "noisy-neighbor" => (
            "quiet p99 <= 250 ms".to_owned(),
            Some(p99.is_some_and(|p| p <= 250.0)),
        ),
        "rate-limit-accuracy" => (
            "each key within 3%".to_owned(),
            row.number("max_error_pct").map(|e| e <= 3.0),
        ),
        "backlog-drain" => (
            ">= 30,000/s, RSS <= 200 MB".to_owned(),
            Some(eps >= 30_000.0 && row.peak_rss_mb.is_some_and(|m| m <= 200.0)),
        ),
        "soak" => (
            "flat: rate ±10%, size +25%".to_owned(),
            row.extra.get("flat").and_then(Value::as_bool),
        ),
        _ => return None,
    };
    Some(Verdict { target, ok })
}

/// The printed table: one line per row, then each row's scenario-specific figures.
pub fn table(rows: &[Row], baseline: Option<f64>) -> String {
    let mut out = String::new();
    line(
        &mut out,
        [
            "scenario",
            "events/s",
            "p50 ms",
            "p99 ms",
            "RSS MB",
            "vs COPY",
            "cpu% sy/pg/ld",
            "target",
            "ok",
        ],
    );
    for row in rows {
        let ratio = ratio(row, baseline);
        let verdict = verdict(row, ratio);
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
        let target = verdict.map(|v| v.target).unwrap_or_default();
        line(
            &mut out,
            [
                &row.scenario,
                &thousands(row.events_per_sec),
                &optional(row.p50_ms, 1),
                &optional(row.p99_ms, 1),
                &optional(row.peak_rss_mb, 0),
                &optional(ratio, 2),
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
        "{scenario:<20} {rate:>10} {p50:>8} {p99:>8} {rss:>8} {ratio:>8} {cpu:>14}  {target:<34} {ok}"
    );
}

/// The `--json` document: `{"SCENARIO": {...}}`.
pub fn json(rows: &[Row], baseline: Option<f64>) -> Value {
    let mut document = Map::new();
    for row in rows {
        let ratio = ratio(row, baseline);
        let verdict = verdict(row, ratio);
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
        entry.insert("ratio".into(), ratio.map_or(Value::Null, |v| round(v, 4)));
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
struct CostPerEvent {
    switchyard: f64,
    postgres: f64,
    /// The loader and the sinks.
    bench: f64,
}

fn cpu_per_event(row: &Row) -> Option<CostPerEvent> {
    let cpu = row.cpu?;
    if row.events_per_sec <= 0.0 {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let micros = |pct: f64| pct / 100.0 * cores / row.events_per_sec * 1e6;
    Some(CostPerEvent {
        switchyard: micros(cpu.switchyard),
        postgres: micros(cpu.postgres),
        bench: micros(cpu.loader + cpu.sink),
    })
}

fn ratio(row: &Row, baseline: Option<f64>) -> Option<f64> {
    baseline
        .filter(|b| *b > 0.0)
        .map(|b| row.events_per_sec / b)
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

    #[test]
    fn targets_are_judged_against_the_baseline() {
        let mut row = Row::new("ingest-batch");
        row.events_per_sec = 60_000.0;
        let table = table(&[row.clone()], Some(100_000.0));
        assert!(table.contains("0.60"), "{table}");
        assert!(table.contains(" yes"), "{table}");
        let document = json(&[row], Some(200_000.0));
        assert_eq!(document["ingest-batch"]["ok"], json!(false));
        assert_eq!(document["ingest-batch"]["ratio"], json!(0.3));
    }
}
