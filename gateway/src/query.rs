//! What the query commands print: plain tables for people, JSON for scripts. Reads only
//! through [`crate::store::Reader`], so it works while the gateway runs.

use std::fmt::Write as _;

use serde::Serialize;

use crate::store::{AlertRecord, DeviceRecord, ReadingRecord, RollupRecord, StateRollupRecord};
use crate::value::Value;

/// Lays out `rows` under `headers` in left-aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let _ = write!(text, "{cell:<width$}", width = widths[i]);
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Compact number for tables: integers without `.0`, others as Rust prints them.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// A value for tables: numbers as [`num`], states as written.
fn val(v: &Value) -> String {
    match v {
        Value::Number(n) => num(*n),
        other => other.to_string(),
    }
}

/// `watchpost alerts`.
pub fn alerts(records: &[AlertRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|a| {
            vec![
                a.at.clone(),
                a.state.clone(),
                a.severity.clone(),
                a.device.clone(),
                a.rule.clone(),
                a.metric.clone(),
                val(&a.value),
                a.threshold.map_or("-".into(), num),
                a.id.clone(),
            ]
        })
        .collect();
    table(
        &[
            "AT",
            "STATE",
            "SEVERITY",
            "DEVICE",
            "RULE",
            "METRIC",
            "VALUE",
            "THRESHOLD",
            "ID",
        ],
        &rows,
    )
}

/// `watchpost history` (rollups).
pub fn rollups(records: &[RollupRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.start.clone(),
                num(r.seconds),
                r.count.to_string(),
                num(r.min),
                num(r.max),
                format!("{:.3}", r.mean),
                num(r.last),
            ]
        })
        .collect();
    table(
        &[
            "WINDOW START",
            "SECONDS",
            "COUNT",
            "MIN",
            "MAX",
            "MEAN",
            "LAST",
        ],
        &rows,
    )
}

/// `watchpost history` of a state stream: changes and the time spent in each state.
pub fn state_rollups(records: &[StateRollupRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let time_in: Vec<String> = r
                .time_in
                .iter()
                .map(|(v, s)| format!("{} {}s", val(v), num((s * 10.0).round() / 10.0)))
                .collect();
            vec![
                r.start.clone(),
                num(r.seconds),
                r.count.to_string(),
                r.changes.to_string(),
                val(&r.last),
                time_in.join(", "),
            ]
        })
        .collect();
    table(
        &[
            "WINDOW START",
            "SECONDS",
            "COUNT",
            "CHANGES",
            "LAST",
            "TIME IN EACH STATE",
        ],
        &rows,
    )
}

/// `watchpost history --raw`.
pub fn readings(records: &[ReadingRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.at.clone(),
                val(&r.value),
                r.seq.map_or("-".into(), |s| s.to_string()),
            ]
        })
        .collect();
    table(&["AT", "VALUE", "SEQ"], &rows)
}

/// `watchpost devices`.
pub fn devices(records: &[DeviceRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|d| {
            vec![
                d.device.clone(),
                d.last_seen.clone(),
                d.messages.to_string(),
                d.readings.to_string(),
                d.decode_errors.to_string(),
                d.lost.to_string(),
                d.duplicated.to_string(),
                d.out_of_order.to_string(),
                d.restarts.to_string(),
                d.unmapped.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "DEVICE",
            "LAST SEEN",
            "MESSAGES",
            "READINGS",
            "MALFORMED",
            "LOST",
            "DUPLICATED",
            "LATE",
            "RESTARTS",
            "UNMAPPED",
        ],
        &rows,
    )
}

/// Pretty JSON of any record list.
pub fn json<T: Serialize>(records: &T) -> String {
    serde_json::to_string_pretty(records).expect("records always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_trailing_space_is_trimmed() {
        let t = table(
            &["A", "LONGER"],
            &[vec!["xyz".into(), "1".into()], vec!["q".into(), "".into()]],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq\n");
    }

    #[test]
    fn numbers_print_compactly() {
        assert_eq!(
            (num(90.0), num(95.25), num(-3.0)),
            ("90".into(), "95.25".into(), "-3".into())
        );
    }
}
