//! A scrape of a `/metrics` endpoint and a small parser of the Prometheus text format
//! (`# HELP`, `# TYPE` and `name{label="value",...} value` lines), enough to assert on
//! what an endpoint reports.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// HELP text by metric family name.
    pub help: BTreeMap<String, String>,
    /// TYPE by metric family name.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Samples named exactly `name`.
    pub fn samples_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |sample| sample.name == name)
    }

    /// Σ values of the samples named `name` (all label sets); `None` if there are none.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for sample in self.samples_named(name) {
            found = true;
            total += sample.value;
        }
        found.then_some(total)
    }

    /// Σ values of `name` with `label` = `value`.
    pub fn sum_where(&self, name: &str, label: &str, value: &str) -> f64 {
        self.samples_named(name)
            .filter(|sample| sample.labels.get(label).map(String::as_str) == Some(value))
            .map(|sample| sample.value)
            .sum()
    }
}

/// GET `http://<address>/metrics` over plain TCP (HTTP/1.0, so no chunked encoding);
/// returns the body. Panics on a non-200 answer.
pub fn scrape(address: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response with a body");
    let status = head.lines().next().unwrap_or_default();
    assert!(
        status.contains(" 200"),
        "metrics endpoint answered {status:?}"
    );
    body.to_owned()
}

/// [`scrape`] + [`parse`], or `None` when nothing answers at `address` (the process has
/// not started its endpoint yet, or has exited) or the answer is not a whole `200`.
pub fn try_scrape(address: &str) -> Option<Exposition> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8(response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.lines().next().unwrap_or_default();
    status.contains(" 200").then(|| parse(body))
}

/// Log events a tally process logged at `level` (`tally_log_events_total`), 0 when it
/// logged none.
pub fn log_events(exposition: &Exposition, level: &str) -> f64 {
    exposition.sum_where("tally_log_events_total", "level", level)
}

/// Σ of the counter `name` over its label sets, 0 when it was never incremented.
pub fn counter(exposition: &Exposition, name: &str) -> f64 {
    exposition.sum(name).unwrap_or(0.0)
}

/// Parses the text format. Panics on a line that is not a comment, blank or a sample.
pub fn parse(text: &str) -> Exposition {
    let mut exposition = Exposition::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            exposition.help.insert(name.to_owned(), help.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line has a type");
            exposition.types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        exposition.samples.push(parse_sample(line));
    }
    exposition
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value in {line:?}")),
    };
    let (name, labels) = match series.split_once('{') {
        None => (series.to_owned(), BTreeMap::new()),
        Some((name, rest)) => {
            let body = rest
                .strip_suffix('}')
                .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
            (name.to_owned(), parse_labels(body, line))
        }
    };
    Sample {
        name,
        labels,
        value,
    }
}

/// `a="x",b="y\"z"` → {a: x, b: y"z}.
fn parse_labels(body: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut name = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            name.push(c);
        }
        assert_eq!(
            chars.next(),
            Some('"'),
            "label value not quoted in {line:?}"
        );
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => panic!("dangling escape in {line:?}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        }
        labels.insert(name.trim().to_owned(), value);
    }
    labels
}
