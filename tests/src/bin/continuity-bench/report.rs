//! Metrics, the table, and target/bench/summary.json.

use serde_json::json;

/// One measured figure, with the floor it is held against when there is one.
#[derive(Debug, Clone)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub floor: Option<(String, f64)>,
    pub target: Option<String>,
}

impl Metric {
    pub fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Self {
            name: name.into(),
            value,
            unit,
            floor: None,
            target: None,
        }
    }
    pub fn floor(mut self, name: impl Into<String>, value: f64) -> Self {
        self.floor = Some((name.into(), value));
        self
    }
    pub fn target(mut self, t: impl Into<String>) -> Self {
        self.target = Some(t.into());
        self
    }
    /// value / floor.
    pub fn ratio(&self) -> Option<f64> {
        self.floor
            .as_ref()
            .filter(|(_, f)| *f > 0.0)
            .map(|(_, f)| self.value / f)
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Prints the table and writes the JSON summary.
pub fn write(metrics: &[Metric], path: &std::path::Path) -> std::io::Result<()> {
    println!(
        "\n{:<58} {:>14} {:<8} {:>12} {:>8}  target",
        "metric", "value", "unit", "floor", "ratio"
    );
    println!("{}", "-".repeat(120));
    for m in metrics {
        let floor = m.floor.as_ref().map(|(_, v)| fmt(*v)).unwrap_or_default();
        let ratio = m.ratio().map(|r| format!("{r:.2}x")).unwrap_or_default();
        println!(
            "{:<58} {:>14} {:<8} {:>12} {:>8}  {}",
            m.name,
            fmt(m.value),
            m.unit,
            floor,
            ratio,
            m.target.clone().unwrap_or_default()
        );
    }
    let summary: Vec<_> = metrics
        .iter()
        .map(|m| {
            let mut o = json!({"name": m.name, "value": m.value, "unit": m.unit});
            if let Some((n, v)) = &m.floor {
                o["floor_name"] = n.clone().into();
                o["floor_value"] = (*v).into();
                o["ratio"] = m.ratio().into();
            }
            if let Some(t) = &m.target {
                o["target"] = t.clone().into();
            }
            o
        })
        .collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
    println!("\nsummary written to {}", path.display());
    Ok(())
}

/// p-th percentile (0..100) of durations in microseconds.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let idx = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[idx.min(samples.len() - 1)]
}
