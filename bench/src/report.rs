//! The closing table: each figure measured beside its target and a plain verdict (the verdict is printed, never
//! asserted).

use std::fmt::Write as _;

/// How a measured figure compares with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// A reference figure, or a target this run does not measure as specified.
    Info,
}

impl Verdict {
    /// `Met` when `ok`, else `Missed`.
    pub fn of(ok: bool) -> Self {
        if ok { Self::Met } else { Self::Missed }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Missed => "MISSED",
            Self::Info => "-",
        }
    }
}

/// Rows of figure / measured / target / verdict.
#[derive(Debug, Default)]
pub struct Table {
    title: String,
    rows: Vec<[String; 4]>,
    notes: Vec<String>,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            ..Self::default()
        }
    }

    pub fn row(
        &mut self,
        figure: impl Into<String>,
        measured: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) {
        self.rows.push([
            figure.into(),
            measured.into(),
            target.into(),
            verdict.as_str().to_owned(),
        ]);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn render(&self) -> String {
        let header = ["figure", "measured", "target", "verdict"];
        let mut widths = header.map(|h| h.chars().count());
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 4]| {
            let mut out = String::from("|");
            for (cell, w) in cells.iter().zip(widths) {
                let pad = w - cell.chars().count();
                let _ = write!(out, " {cell}{} |", " ".repeat(pad));
            }
            out.push('\n');
            out
        };
        let mut out = format!("\n== {} ==\n", self.title);
        out.push_str(&line(header));
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&line([&rule[0], &rule[1], &rule[2], &rule[3]]));
        for row in &self.rows {
            out.push_str(&line([&row[0], &row[1], &row[2], &row[3]]));
        }
        for note in &self.notes {
            let _ = writeln!(out, "* {note}");
        }
        out
    }
}

/// `12345.6` as `12,346`.
pub fn thousands(value: f64) -> String {
    let n = value.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Per second, guarding against a zero duration.
pub fn rate(count: f64, elapsed: std::time::Duration) -> f64 {
    count / elapsed.as_secs_f64().max(1e-9)
}

/// The `p`-th percentile (0..=100) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_percentiles() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 95.0), 95.0);
        assert_eq!(percentile(&values, 100.0), 100.0);
        let mut table = Table::new("t");
        table.row("a", "1", "2", Verdict::Met);
        assert!(
            table
                .render()
                .contains("| a      | 1        | 2      | met     |")
        );
    }
}
