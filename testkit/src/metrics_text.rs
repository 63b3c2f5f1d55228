//! The Prometheus text exposition format (what `/metrics` answers), parsed into
//! samples: `name{label="value",...} value [timestamp]` lines, `#` lines (`# HELP`,
//! `# TYPE`, comments) and blank lines skipped.
//!
//! ```
//! use kvroute_testkit::metrics_text::Samples;
//!
//! let page = "# TYPE kvroute_requests_total counter\n\
//!             kvroute_requests_total{status=\"200\",key=\"a\"} 3\n\
//!             kvroute_requests_total{status=\"503\",key=\"a\"} 1\n";
//! let m = Samples::parse(page);
//! assert_eq!(m.get("kvroute_requests_total", &[("status", "200"), ("key", "a")]), Some(3.0));
//! assert_eq!(m.sum("kvroute_requests_total", &[("key", "a")]), 4.0);
//! assert_eq!(m.series("kvroute_requests_total{status=\"503\",key=\"a\"}"), Some(1.0));
//! ```

use std::collections::BTreeMap;
use std::fmt;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The metric name, with any `_sum`/`_count`/`_bucket` suffix as written.
    pub name: String,
    /// Its labels in the order written, values unescaped.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the sample has every one of `labels` (and maybe others).
    pub fn has_labels(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }

    /// Whether the sample has exactly `labels`, in any order.
    pub fn has_exactly(&self, labels: &[(&str, &str)]) -> bool {
        self.labels.len() == labels.len() && self.has_labels(labels)
    }
}

/// A line that is not a sample, a comment or blank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub text: String,
    pub why: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {:?}", self.line, self.why, self.text)
    }
}

impl std::error::Error for ParseError {}

/// The samples of one exposition, in the order written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// Every sample line of `text`; lines that do not parse are skipped (a page that
    /// is not an exposition at all, such as an error body, has no samples).
    pub fn parse(text: &str) -> Samples {
        Samples(
            text.lines()
                .filter_map(|l| parse_line(l).ok().flatten())
                .collect(),
        )
    }

    /// Every sample line of `text`, or the first line that is not one.
    pub fn try_parse(text: &str) -> Result<Samples, ParseError> {
        let mut out = Vec::new();
        for (i, l) in text.lines().enumerate() {
            match parse_line(l) {
                Ok(Some(s)) => out.push(s),
                Ok(None) => {}
                Err(why) => {
                    return Err(ParseError {
                        line: i + 1,
                        text: l.to_owned(),
                        why,
                    })
                }
            }
        }
        Ok(Samples(out))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Sample> {
        self.0.iter()
    }

    /// The samples called `name` (exactly, no prefix match).
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| s.name == name)
    }

    /// The value of the series `name` with exactly `labels` (in any order).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.named(name)
            .find(|s| s.has_exactly(labels))
            .map(|s| s.value)
    }

    /// The sum of the samples called `name` that have every one of `labels` (and maybe
    /// others); 0 when there are none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.named(name)
            .filter(|s| s.has_labels(labels))
            .map(|s| s.value)
            .sum()
    }

    /// [`Samples::sum`] split by the value of label `by`; samples without it are left
    /// out.
    pub fn sum_by(&self, name: &str, labels: &[(&str, &str)], by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.named(name).filter(|s| s.has_labels(labels)) {
            if let Some(v) = s.label(by) {
                *out.entry(v.to_owned()).or_default() += s.value;
            }
        }
        out
    }

    /// The value of the series written as `/metrics` writes it, `name` or
    /// `name{label="value",...}` (labels in any order, all of them).
    ///
    /// # Panics
    ///
    /// If `series` is not a series name with optional labels.
    pub fn series(&self, series: &str) -> Option<f64> {
        with_series(series, |name, labels| self.get(name, labels))
    }

    /// [`Samples::series`], but summed over the samples that have the labels given
    /// (and maybe others).
    ///
    /// # Panics
    ///
    /// If `series` is not a series name with optional labels.
    pub fn series_sum(&self, series: &str) -> f64 {
        with_series(series, |name, labels| self.sum(name, labels))
    }
}

/// `f` on the name and labels of `series` as `/metrics` writes it.
///
/// # Panics
///
/// If `series` is not a series name with optional labels.
fn with_series<T>(series: &str, f: impl FnOnce(&str, &[(&str, &str)]) -> T) -> T {
    let (name, labels) =
        parse_series(series).unwrap_or_else(|why| panic!("series {series:?}: {why}"));
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    f(&name, &labels)
}

type Labels = Vec<(String, String)>;

/// A sample, `None` for a comment or blank line, or why the line is neither.
fn parse_line(line: &str) -> Result<Option<Sample>, &'static str> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let (name, labels, rest) = parse_series_prefix(line)?;
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = parse_value(value).ok_or("the value is not a number")?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| "the timestamp is not an integer")?;
    }
    if fields.next().is_some() {
        return Err("text after the timestamp");
    }
    Ok(Some(Sample {
        name,
        labels,
        value,
    }))
}

/// `name` or `name{labels}`, nothing after it.
fn parse_series(series: &str) -> Result<(String, Labels), &'static str> {
    let (name, labels, rest) = parse_series_prefix(series.trim())?;
    if !rest.trim().is_empty() {
        return Err("text after the series");
    }
    Ok((name, labels))
}

/// The name and labels at the start of `s`, and what follows them.
fn parse_series_prefix(s: &str) -> Result<(String, Labels, &str), &'static str> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    let (name, mut rest) = s.split_at(end);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("no metric name");
    }
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        rest = parse_labels(body, &mut labels)?;
    }
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return Err("no space after the series");
    }
    Ok((name.to_owned(), labels, rest))
}

/// The labels of `body` (after the `{`) into `out`; what follows the `}`.
fn parse_labels<'a>(mut body: &'a str, out: &mut Labels) -> Result<&'a str, &'static str> {
    loop {
        body = body.trim_start();
        if let Some(rest) = body.strip_prefix('}') {
            return Ok(rest);
        }
        let eq = body.find('=').ok_or("a label without `=`")?;
        let key = body[..eq].trim();
        if key.is_empty() {
            return Err("a label without a name");
        }
        let quoted = body[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("a label value without quotes")?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let after = loop {
            match chars.next().ok_or("an unterminated label value")? {
                (i, '"') => break &quoted[i + 1..],
                (_, '\\') => match chars.next().ok_or("an unterminated label value")?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key.to_owned(), value));
        body = after.trim_start();
        if let Some(rest) = body.strip_prefix(',') {
            body = rest;
        } else if !body.starts_with('}') {
            return Err("labels not separated by `,`");
        }
    }
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN`.
fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# HELP kvroute_requests_total Requests answered.
# TYPE kvroute_requests_total counter
kvroute_requests_total{key=\"alice\",status=\"200\"} 3
kvroute_requests_total{key=\"bob\",status=\"200\"} 2
kvroute_requests_total{key=\"alice\",status=\"401\"} 1

kvroute_queue_depth 0
kvroute_requests_total_other 100
kvroute_queue_wait_seconds_bucket{le=\"0.5\"} 4
kvroute_queue_wait_seconds_bucket{le=\"+Inf\"} 7
kvroute_queue_wait_seconds_sum 1.25e0
kvroute_queue_wait_seconds_count 7 1700000000000
vllm:cache_config_info{model_name=\"m\",block_size=\"16\"} 1
";

    #[test]
    fn samples_are_found_by_name_and_labels_and_comments_are_skipped() {
        let m = Samples::try_parse(PAGE).unwrap();
        assert_eq!(m.0.len(), 10, "{m:?}");
        assert!(m.iter().all(|s| !s.name.starts_with('#')));
        assert_eq!(
            m.get(
                "kvroute_requests_total",
                &[("status", "200"), ("key", "bob")]
            ),
            Some(2.0)
        );
        // A subset of the labels is not the series.
        assert_eq!(m.get("kvroute_requests_total", &[("key", "bob")]), None);
        assert_eq!(m.get("kvroute_queue_depth", &[]), Some(0.0));
        assert_eq!(m.get("kvroute_queue_wait_seconds_count", &[]), Some(7.0));
        assert_eq!(m.get("kvroute_queue_wait_seconds_sum", &[]), Some(1.25));
        assert_eq!(m.get("vllm:cache_config_info", &[]), None);
        let info = m.named("vllm:cache_config_info").next().unwrap();
        assert_eq!(info.label("block_size"), Some("16"));
        assert_eq!(info.label("model_name"), Some("m"));
        assert_eq!(info.label("num_gpu_blocks"), None);
    }

    #[test]
    fn sums_match_the_name_exactly_and_a_subset_of_labels() {
        let m = Samples::parse(PAGE);
        // Not a prefix match: kvroute_requests_total_other is another metric.
        assert_eq!(m.sum("kvroute_requests_total", &[]), 6.0);
        assert_eq!(m.sum("kvroute_requests_total", &[("key", "alice")]), 4.0);
        assert_eq!(m.sum("kvroute_requests_total", &[("key", "carol")]), 0.0);
        assert_eq!(m.sum("kvroute_absent", &[]), 0.0);
        let by_status = m.sum_by("kvroute_requests_total", &[], "status");
        assert_eq!(
            by_status.into_iter().collect::<Vec<_>>(),
            [("200".to_owned(), 5.0), ("401".to_owned(), 1.0)]
        );
        let bob = m.sum_by("kvroute_requests_total", &[("key", "bob")], "status");
        assert_eq!(bob.len(), 1);
    }

    #[test]
    fn infinities_and_nan_are_values() {
        let m = Samples::try_parse("a{le=\"+Inf\"} +Inf\nb -Inf\nc NaN\nd Inf\ne 1e3\n").unwrap();
        assert_eq!(m.get("a", &[("le", "+Inf")]), Some(f64::INFINITY));
        assert_eq!(m.get("b", &[]), Some(f64::NEG_INFINITY));
        assert!(m.get("c", &[]).unwrap().is_nan());
        assert_eq!(m.get("d", &[]), Some(f64::INFINITY));
        assert_eq!(m.get("e", &[]), Some(1000.0));
        assert_eq!(
            Samples::parse(PAGE).get("kvroute_queue_wait_seconds_bucket", &[("le", "+Inf")]),
            Some(7.0)
        );
    }

    #[test]
    fn label_values_are_unescaped() {
        let line = r#"m{path="C:\\dir",msg="say \"hi\", then\nbye",empty="",sp = "a b} 9"} 5"#;
        let m = Samples::try_parse(line).unwrap();
        let s = &m.0[0];
        assert_eq!(s.label("path"), Some(r"C:\dir"));
        assert_eq!(s.label("msg"), Some("say \"hi\", then\nbye"));
        assert_eq!(s.label("empty"), Some(""));
        assert_eq!(s.label("sp"), Some("a b} 9"));
        assert_eq!(s.value, 5.0);
        // A trailing comma before `}` is allowed by the format.
        let m = Samples::try_parse("m{a=\"1\",} 2").unwrap();
        assert_eq!(m.get("m", &[("a", "1")]), Some(2.0));
    }

    #[test]
    fn series_are_looked_up_as_metrics_writes_them() {
        let m = Samples::parse(PAGE);
        assert_eq!(
            m.series("kvroute_requests_total{key=\"alice\",status=\"401\"}"),
            Some(1.0)
        );
        // Labels in another order are the same series.
        assert_eq!(
            m.series("kvroute_requests_total{status=\"401\",key=\"alice\"}"),
            Some(1.0)
        );
        assert_eq!(m.series("kvroute_requests_total{key=\"alice\"}"), None);
        assert_eq!(m.series("kvroute_queue_depth"), Some(0.0));
        assert_eq!(m.series("kvroute_queue"), None);
        assert_eq!(m.series_sum("kvroute_requests_total{key=\"alice\"}"), 4.0);
        assert_eq!(m.series_sum("kvroute_requests_total"), 6.0);
    }

    #[test]
    #[should_panic(expected = "series")]
    fn a_malformed_series_is_a_bug_in_the_caller() {
        Samples::default().series("m{a=1}");
    }

    #[test]
    fn lines_that_are_not_samples_are_errors_or_skipped() {
        for bad in [
            "m",
            "m{a=\"1\"}",
            "m{a=\"1\" 2",
            "m{a=1} 2",
            "m{a=\"1\"b=\"2\"} 3",
            "m x",
            "m 1 2 3",
            "m 1 t",
            "{a=\"1\"} 2",
            "9m 1",
            "<html>not found</html>",
        ] {
            let e = Samples::try_parse(&format!("ok 1\n{bad}\n")).unwrap_err();
            assert_eq!(e.line, 2, "{bad}: {e}");
            assert_eq!(
                Samples::parse(&format!("ok 1\n{bad}\n")).0.len(),
                1,
                "{bad}"
            );
        }
        assert_eq!(Samples::try_parse("").unwrap(), Samples::default());
    }
}
