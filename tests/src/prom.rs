//! A parser of the Prometheus text exposition format (what `/metrics` serves), strict enough
//! to fail a test on a malformed line, and the checks every histogram must pass.

use std::collections::{BTreeMap, BTreeSet};

/// A series' labels but `le`, in order.
type Labels = Vec<(String, String)>;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series name (`x_bucket` for a histogram bucket).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed scrape: the samples and each family's `# TYPE`.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Family name → type (counter, gauge, histogram).
    pub types: BTreeMap<String, String>,
}

/// GETs `/metrics` on 127.0.0.1:`port` and parses it (panics on a non-200 or a bad line).
pub fn scrape(port: u16) -> Scrape {
    let (status, body) = crate::http_get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

/// Parses the text format; panics naming the first malformed line.
pub fn parse(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect(line);
            assert!(
                ["counter", "gauge", "histogram"].contains(&ty),
                "bad type: {line}"
            );
            assert!(
                s.types.insert(name.into(), ty.into()).is_none(),
                "duplicate TYPE: {line}"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        s.samples.push(sample(line));
    }
    s
}

fn sample(line: &str) -> Sample {
    let (series, value) = line.rsplit_once(' ').expect(line);
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("bad value: {line}"));
    let (name, labels) = match series.split_once('{') {
        Some((n, l)) => (n, l.strip_suffix('}').expect(line)),
        None => (series, ""),
    };
    assert!(
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
        "bad name: {line}"
    );
    let mut map = BTreeMap::new();
    let mut rest = labels;
    while !rest.is_empty() {
        let (k, v) = rest.split_once("=\"").expect(line);
        let end = v.find('"').expect(line);
        map.insert(k.to_string(), v[..end].to_string());
        rest = v[end + 1..].strip_prefix(',').unwrap_or(&v[end + 1..]);
    }
    Sample {
        name: name.into(),
        labels: map,
        value,
    }
}

impl Scrape {
    /// The value of the one sample named `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?} matches {} samples",
            found.len()
        );
        found.first().copied()
    }

    /// Every family name (a histogram's, not its `_bucket`/`_sum`/`_count` series).
    pub fn families(&self) -> BTreeSet<String> {
        self.types.keys().cloned().collect()
    }

    /// Checks every histogram: each series' buckets rise with `le`, end at `+Inf`, and
    /// `+Inf` equals `_count`; returns how many series were checked.
    pub fn check_histograms(&self) -> usize {
        let mut checked = 0;
        for (family, _) in self.types.iter().filter(|(_, t)| *t == "histogram") {
            let bucket = format!("{family}_bucket");
            let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
            for s in self.samples.iter().filter(|s| s.name == bucket) {
                let le = s.labels.get("le").expect("bucket without le");
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                let key = s
                    .labels
                    .iter()
                    .filter(|(k, _)| *k != "le")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                series.entry(key).or_default().push((le, s.value));
            }
            for (labels, buckets) in series {
                let l: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                assert!(
                    buckets
                        .windows(2)
                        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                    "{family} {labels:?}: buckets not cumulative: {buckets:?}"
                );
                let last = buckets.last().unwrap();
                assert!(last.0.is_infinite(), "{family} {labels:?}: no +Inf bucket");
                let count = self
                    .value(&format!("{family}_count"), &l)
                    .expect("no _count");
                assert_eq!(last.1, count, "{family} {labels:?}: +Inf != _count");
                let sum = self.value(&format!("{family}_sum"), &l).expect("no _sum");
                assert!(sum >= 0.0, "{family} {labels:?}: negative _sum");
                checked += 1;
            }
        }
        checked
    }
}
