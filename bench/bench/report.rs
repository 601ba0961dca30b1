//! The results table: one row per measurement with its baseline, ratio and target,
//! semantic checks that fail the run, and the printed and JSON forms.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub failures: Vec<String>,
}

/// How a target compares: at least or at most.
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Report {
    pub fn add(&mut self, scenario: &str, metric: &str, value: f64, unit: &str) -> &mut Row {
        self.rows.push(Row {
            scenario: scenario.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            baseline_name: None,
            baseline: None,
            ratio: None,
            target: None,
            met: None,
            note: String::new(),
        });
        let row = self.rows.last_mut().expect("just pushed");
        eprintln!(
            "  {:<10} {:<44} {}",
            row.scenario,
            row.metric,
            fmt_val(value, unit)
        );
        row
    }

    /// A semantic check that must hold (exactly-once, no errors): recorded and failing the run.
    pub fn check(&mut self, what: String, ok: bool) {
        if !ok {
            eprintln!("  CHECK FAILED: {what}");
            self.failures.push(what);
        }
    }

    pub fn print(&self) {
        println!();
        println!(
            "{:<9} {:<46} {:>14} {:>24} {:>8} {:>12} {:>5}",
            "scenario", "metric", "value", "baseline", "ratio", "target", "met"
        );
        println!("{}", "-".repeat(126));
        for r in &self.rows {
            let base = match (&r.baseline_name, r.baseline) {
                (Some(n), Some(b)) => format!("{} {}", n, fmt_num(b)),
                _ => String::new(),
            };
            let ratio = r.ratio.map(|x| format!("{x:.2}x")).unwrap_or_default();
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            println!(
                "{:<9} {:<46} {:>14} {:>24} {:>8} {:>12} {:>5}",
                r.scenario,
                trunc(&r.metric, 46),
                fmt_val(r.value, &r.unit),
                trunc(&base, 24),
                ratio,
                r.target.as_deref().unwrap_or(""),
                met
            );
        }
        for r in self.rows.iter().filter(|r| !r.note.is_empty()) {
            println!("  note [{} / {}]: {}", r.scenario, r.metric, r.note);
        }
    }
}

impl Row {
    pub fn baseline(&mut self, name: &str, value: f64) -> &mut Row {
        self.baseline_name = Some(name.into());
        self.baseline = Some(value);
        self.ratio = (value > 0.0).then(|| self.value / value);
        self
    }
    pub fn target(&mut self, t: Target) -> &mut Row {
        let (text, met) = match t {
            Target::AtLeast(x) => (format!(">= {}", fmt_num(x)), self.value >= x),
            Target::AtMost(x) => (format!("< {}", fmt_num(x)), self.value < x),
        };
        self.target = Some(format!("{text} {}", self.unit));
        self.met = Some(met);
        self
    }
    /// A target on the ratio to the baseline rather than on the value.
    pub fn ratio_target(&mut self, at_least: f64) -> &mut Row {
        let r = self.ratio.unwrap_or(0.0);
        self.target = Some(format!(">= {:.0}% of base", at_least * 100.0));
        self.met = Some(r >= at_least);
        self
    }
    pub fn note(&mut self, n: impl Into<String>) -> &mut Row {
        if !self.note.is_empty() {
            self.note.push_str("; ");
        }
        self.note.push_str(&n.into());
        self
    }
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_val(x: f64, unit: &str) -> String {
    format!("{} {unit}", fmt_num(x))
}
