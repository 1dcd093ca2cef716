//! Online commands: per-core figures read from a live server's admin port.
//!
//! Both commands scrape `GET /metrics` (plain HTTP/1.1 over a `TcpStream`: the admin
//! endpoint answers one request per connection, then closes), parse the Prometheus text
//! format into [`Sample`]s ([`parse_metrics`]: what `ternd` emits, no more), and turn two
//! scrapes taken an interval apart into [`Figures`] ([`figures`]): rates from counter
//! deltas, latency quantiles from histogram bucket deltas the way PromQL's
//! `histogram_quantile` computes them ([`histogram_quantile`]). Parsing and arithmetic
//! are pure and unit-tested here; `stats` prints the figures once, `top` redraws them
//! every second with ratatui.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{CtlError, Outcome};

/// How long the admin endpoint may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long it may take to answer (it renders from memory: milliseconds).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response read: ternd's metrics are tens of KiB even with many shards.
const RESPONSE_BYTES_MAX: u64 = 16 << 20;
/// Between the two scrapes of `stats`, and between `top`'s refreshes.
const INTERVAL: Duration = Duration::from_secs(1);

/// `ternctl stats`: two scrapes a second apart, one table per core plus totals.
pub fn stats(admin: &str) -> Result<Outcome, CtlError> {
    let first = scrape(admin)?;
    let started = Instant::now();
    std::thread::sleep(INTERVAL);
    let second = scrape(admin)?;
    let figures = figures(&first, &second, started.elapsed());
    print!("{}", render_stats(admin, &figures));
    Ok(Outcome::Ok)
}

/// `ternctl top`: the same figures, full screen, refreshed every second; `q`, Esc or
/// Ctrl-C quits. The terminal is restored however the view ends (ratatui's `init` also
/// installs a panic hook that restores it).
pub fn top(admin: &str) -> Result<Outcome, CtlError> {
    // An unreachable server is reported on a normal terminal, before the screen changes.
    let first = scrape(admin)?;
    let mut terminal = ratatui::try_init()?;
    let result = run_top(&mut terminal, admin, first);
    ratatui::restore();
    result
}

// ---------------------------------------------------------------------------------------
// Scraping
// ---------------------------------------------------------------------------------------

/// One `GET /metrics` on `admin` (`host:port`), parsed.
pub fn scrape(admin: &str) -> Result<Vec<Sample>, CtlError> {
    let unreachable =
        |why: String| format!("cannot reach ternd's admin endpoint at {admin}: {why}");
    let addresses = admin.to_socket_addrs().map_err(|e| unreachable(e.to_string()))?;
    let mut why = String::from("the address resolves to nothing");
    let mut stream = None;
    for address in addresses {
        match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(error) => why = error.to_string(),
        }
    }
    let mut stream = stream.ok_or_else(|| unreachable(why))?;
    let failed = |e: std::io::Error| format!("reading metrics from {admin}: {e}");
    stream.set_read_timeout(Some(READ_TIMEOUT)).map_err(failed)?;
    stream.set_write_timeout(Some(READ_TIMEOUT)).map_err(failed)?;
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
        .map_err(failed)?;
    let mut response = Vec::new();
    stream.take(RESPONSE_BYTES_MAX).read_to_end(&mut response).map_err(failed)?;
    let body = metrics_body(&response).map_err(|why| format!("{admin}: {why}"))?;
    Ok(parse_metrics(body).map_err(|e| format!("{admin}: {e}"))?)
}

/// The body of an HTTP response that must be `200` (ternd's admin endpoint sends
/// `Content-Length` and closes, so the body is everything after the head).
fn metrics_body(response: &[u8]) -> Result<&str, String> {
    let text = std::str::from_utf8(response).map_err(|_| "the response is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("the response is not HTTP")?;
    let status = head.lines().next().unwrap_or_default();
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(body),
        _ => Err(format!("/metrics answered {status:?}")),
    }
}

// ---------------------------------------------------------------------------------------
// The text format
// ---------------------------------------------------------------------------------------

/// One sample line of the text format: `name{label="value",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The metric name (with `_bucket`, `_sum`, `_count` for histogram series).
    pub name: String,
    /// Label pairs in the order given.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A line of the metrics text that is not a comment, a blank or a sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub what: &'static str,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "metrics line {}: {}", self.line, self.what)
    }
}

impl std::error::Error for ParseError {}

/// Parses the Prometheus text format (version 0.0.4) as ternd writes it: `# HELP` and
/// `# TYPE` comments (skipped), and sample lines with optional labels and an optional
/// timestamp (ignored).
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        samples.push(parse_sample(line).map_err(|what| ParseError { line: index + 1, what })?);
    }
    Ok(samples)
}

fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line.find(['{', ' ', '\t']).ok_or("a sample without a value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err("a bad metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inside) = rest.strip_prefix('{') {
        rest = inside;
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let equals = rest.find('=').ok_or("a label without a value")?;
            let key = rest[..equals].trim();
            if !is_label_name(key) {
                return Err("a bad label name");
            }
            rest = rest[equals + 1..].trim_start().strip_prefix('"').ok_or("an unquoted label")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("an unterminated label value"),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        _ => return Err("a bad escape in a label value"),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            rest = rest[end + 1..].trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next().ok_or("a sample without a value")?)?;
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<i64>().map_err(|_| "a bad timestamp")?;
    }
    if fields.next().is_some() {
        return Err("text after the value");
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

fn parse_value(text: &str) -> Result<f64, &'static str> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|_| "a bad value"),
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// ---------------------------------------------------------------------------------------
// Figures from two scrapes
// ---------------------------------------------------------------------------------------

/// The median and 99th percentile of a latency over the interval, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latency {
    /// 50th percentile.
    pub p50_s: f64,
    /// 99th percentile.
    pub p99_s: f64,
}

/// What one core (or all of them) did over the interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CoreFigures {
    /// Open connections at the end of the interval.
    pub connections: f64,
    /// Messages accepted per second (`tern_messages_sent_total`).
    pub messages_in_per_s: f64,
    /// Envelopes delivered per second (`tern_messages_delivered_total`).
    pub messages_out_per_s: f64,
    /// Records per group commit over the interval; `None` without commits.
    pub commit_batch_records: Option<f64>,
    /// Send → sent tick; `None` without sends in the interval.
    pub send_to_sent: Option<Latency>,
    /// Send → delivered to a connection; `None` without deliveries in the interval.
    pub send_to_deliver: Option<Latency>,
    /// Bytes allocated to the core's shards' files at the end of the interval.
    pub disk_used_bytes: f64,
}

/// Counts since the server started (the latest scrape).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SinceStart {
    /// Messages accepted.
    pub messages_sent: f64,
    /// Envelopes delivered.
    pub messages_delivered: f64,
    /// Connections accepted.
    pub connections_accepted: f64,
    /// Connections that failed.
    pub connections_failed: f64,
}

/// The figures of two scrapes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// Seconds between the scrapes.
    pub interval_s: f64,
    /// Each core, by its `core` label (in numeric order).
    pub cores: Vec<(String, CoreFigures)>,
    /// All cores together.
    pub total: CoreFigures,
    /// Free bytes on the data directory's file system, if reported.
    pub disk_free_bytes: Option<f64>,
    /// Size of that file system, if reported.
    pub disk_size_bytes: Option<f64>,
    /// Totals since start.
    pub since_start: SinceStart,
}

/// Which samples a figure adds up: every core, or one.
#[derive(Clone, Copy)]
enum Cores<'a> {
    All,
    One(&'a str),
}

impl Cores<'_> {
    fn admits(self, sample: &Sample) -> bool {
        match self {
            Cores::All => true,
            Cores::One(core) => sample.label("core") == Some(core),
        }
    }
}

/// Per-core figures from `before` and `after`, taken `interval` apart. A counter that
/// went down was reset (the server restarted): its whole value counts as the increase,
/// as PromQL's `increase` assumes. A series missing from `before` (a core whose first
/// push had not arrived) adds nothing to the rates.
pub fn figures(before: &[Sample], after: &[Sample], interval: Duration) -> Figures {
    let interval_s = interval.as_secs_f64().max(f64::MIN_POSITIVE);
    let mut cores: Vec<String> = after
        .iter()
        .filter(|s| s.name == "tern_connections")
        .filter_map(|s| s.label("core").map(str::to_string))
        .collect();
    cores.sort_by_key(|core| (core.parse::<u64>().unwrap_or(u64::MAX), core.clone()));
    cores.dedup();
    let figure = |which: Cores| CoreFigures {
        connections: sum(after, "tern_connections", which),
        messages_in_per_s: increase(before, after, "tern_messages_sent_total", which) / interval_s,
        messages_out_per_s: increase(before, after, "tern_messages_delivered_total", which)
            / interval_s,
        commit_batch_records: {
            let commits = increase(before, after, "tern_commits_total", which);
            let records = increase(before, after, "tern_committed_records_total", which);
            (commits > 0.0).then(|| records / commits)
        },
        send_to_sent: latency(before, after, "tern_send_to_sent_seconds", which),
        send_to_deliver: latency(before, after, "tern_send_to_deliver_seconds", which),
        disk_used_bytes: sum(after, "tern_disk_used_bytes", which),
    };
    let unlabelled = |name: &str| after.iter().find(|s| s.name == name).map(|s| s.value);
    Figures {
        interval_s,
        cores: cores.iter().map(|core| (core.clone(), figure(Cores::One(core)))).collect(),
        total: figure(Cores::All),
        disk_free_bytes: unlabelled("tern_disk_free_bytes"),
        disk_size_bytes: unlabelled("tern_disk_size_bytes"),
        since_start: SinceStart {
            messages_sent: sum(after, "tern_messages_sent_total", Cores::All),
            messages_delivered: sum(after, "tern_messages_delivered_total", Cores::All),
            connections_accepted: sum(after, "tern_connections_accepted_total", Cores::All),
            connections_failed: sum(after, "tern_connections_failed_total", Cores::All),
        },
    }
}

fn sum(samples: &[Sample], name: &str, which: Cores) -> f64 {
    samples.iter().filter(|s| s.name == name && which.admits(s)).map(|s| s.value).sum()
}

/// The increase of every series of `name` (of the admitted cores), added up.
fn increase(before: &[Sample], after: &[Sample], name: &str, which: Cores) -> f64 {
    increases(before, after, name, which).map(|(_, delta)| delta).sum()
}

/// Each series' increase between the scrapes, with the series.
fn increases<'a>(
    before: &'a [Sample],
    after: &'a [Sample],
    name: &'a str,
    which: Cores<'a>,
) -> impl Iterator<Item = (&'a Sample, f64)> + 'a {
    after.iter().filter(move |s| s.name == name && which.admits(s)).filter_map(move |now| {
        let then = before.iter().find(|b| b.name == now.name && b.labels == now.labels)?;
        let delta = if now.value >= then.value { now.value - then.value } else { now.value };
        Some((now, delta))
    })
}

/// p50 and p99 of histogram `name` over the interval, from its bucket deltas summed
/// over the admitted cores.
fn latency(before: &[Sample], after: &[Sample], name: &str, which: Cores) -> Option<Latency> {
    let bucket = format!("{name}_bucket");
    let mut by_bound: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (sample, delta) in increases(before, after, &bucket, which) {
        let Some(bound) = sample.label("le").and_then(|le| parse_value(le).ok()) else {
            continue;
        };
        // Keyed by the bound's bits: bounds are positive, so their bits sort like them.
        by_bound.entry(bound.to_bits()).or_insert((bound, 0.0)).1 += delta;
    }
    let buckets: Vec<(f64, f64)> = by_bound.into_values().collect();
    Some(Latency {
        p50_s: histogram_quantile(0.5, &buckets)?,
        p99_s: histogram_quantile(0.99, &buckets)?,
    })
}

/// The `q` quantile of a histogram given as (upper bound, cumulative count) pairs in
/// ascending order, the last bound `+Inf`: PromQL's `histogram_quantile`. The rank is
/// found by linear interpolation inside its bucket (the first bucket starts at 0); a
/// rank in the `+Inf` bucket gives the highest finite bound. `None` without
/// observations or without a `+Inf` bucket.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let (&(last_bound, observations), finite) = buckets.split_last()?;
    if last_bound != f64::INFINITY || finite.is_empty() || observations <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * observations;
    let index = buckets.iter().position(|(_, count)| *count >= rank)?;
    if index == buckets.len() - 1 {
        return Some(finite[finite.len() - 1].0);
    }
    let (upper, count) = buckets[index];
    if index == 0 && upper <= 0.0 {
        return Some(upper);
    }
    let (lower, below) = if index == 0 { (0.0, 0.0) } else { buckets[index - 1] };
    let in_bucket = count - below;
    if in_bucket <= 0.0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below) / in_bucket)
}

// ---------------------------------------------------------------------------------------
// Presentation
// ---------------------------------------------------------------------------------------

/// The table's column headings.
const HEADINGS: [&str; 10] = [
    "",
    "conns",
    "msgs in/s",
    "msgs out/s",
    "batch",
    "sent p50",
    "sent p99",
    "deliver p50",
    "deliver p99",
    "disk used",
];

/// One row of the table: the label, then each figure as text (`-`: nothing to show).
fn row_cells(label: &str, figures: &CoreFigures) -> [String; 10] {
    let latency = |l: Option<Latency>, pick: fn(&Latency) -> f64| {
        l.as_ref().map_or_else(|| "-".to_string(), |l| seconds(pick(l)))
    };
    [
        label.to_string(),
        format!("{}", figures.connections),
        format!("{:.1}", figures.messages_in_per_s),
        format!("{:.1}", figures.messages_out_per_s),
        figures.commit_batch_records.map_or_else(|| "-".to_string(), |b| format!("{b:.1}")),
        latency(figures.send_to_sent, |l| l.p50_s),
        latency(figures.send_to_sent, |l| l.p99_s),
        latency(figures.send_to_deliver, |l| l.p50_s),
        latency(figures.send_to_deliver, |l| l.p99_s),
        bytes(figures.disk_used_bytes),
    ]
}

/// Every row: one per core, then the total.
fn rows(figures: &Figures) -> Vec<[String; 10]> {
    let mut rows: Vec<[String; 10]> =
        figures.cores.iter().map(|(core, f)| row_cells(&format!("core {core}"), f)).collect();
    rows.push(row_cells("total", &figures.total));
    rows
}

/// The lines under the table: disk space and the totals since start.
fn summary_lines(figures: &Figures) -> Vec<String> {
    let disk = match (figures.disk_free_bytes, figures.disk_size_bytes) {
        (Some(free), Some(size)) => format!("disk: {} free of {}", bytes(free), bytes(size)),
        _ => "disk: free space not reported".to_string(),
    };
    let s = figures.since_start;
    let since = format!(
        "since start: {} messages sent, {} delivered; {} connections accepted, {} failed",
        s.messages_sent, s.messages_delivered, s.connections_accepted, s.connections_failed
    );
    vec![disk, since]
}

/// `ternctl stats`'s output.
fn render_stats(admin: &str, figures: &Figures) -> String {
    let mut out = format!("ternd at {admin}, over {:.2} s\n", figures.interval_s);
    let rows = rows(figures);
    let widths: Vec<usize> = (0..HEADINGS.len())
        .map(|i| rows.iter().map(|r| r[i].len()).chain([HEADINGS[i].len()]).max().unwrap_or(0))
        .collect();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == 0 {
                let _ = write!(text, "{cell:<width$}", width = widths[i]);
            } else {
                let _ = write!(text, "  {cell:>width$}", width = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&HEADINGS);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    for summary in summary_lines(figures) {
        out.push_str(&summary);
        out.push('\n');
    }
    out
}

/// Seconds in a readable unit: `850 µs`, `1.25 ms`, `2.50 s`.
fn seconds(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// Bytes in binary units: `512 B`, `64.0 MiB`.
fn bytes(b: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = b;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

// ---------------------------------------------------------------------------------------
// top
// ---------------------------------------------------------------------------------------

fn run_top(
    terminal: &mut ratatui::DefaultTerminal,
    admin: &str,
    first: Vec<Sample>,
) -> Result<Outcome, CtlError> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    let mut previous = (first, Instant::now());
    let mut shown: Option<Figures> = None;
    let mut problem: Option<String> = None;
    let mut next_scrape = Instant::now() + INTERVAL;
    loop {
        terminal.draw(|frame| draw_top(frame, admin, shown.as_ref(), problem.as_deref()))?;
        let wait = next_scrape.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            if let Event::Key(key) = event::read()? {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                let quit = matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c;
                if key.kind == KeyEventKind::Press && quit {
                    return Ok(Outcome::Ok);
                }
            }
            // Any other event (a resize, a key) just redraws.
            continue;
        }
        next_scrape = Instant::now() + INTERVAL;
        // A failed scrape (the server restarting, say) is shown and retried next second.
        match scrape(admin) {
            Ok(samples) => {
                let now = Instant::now();
                shown = Some(figures(&previous.0, &samples, now - previous.1));
                previous = (samples, now);
                problem = None;
            }
            Err(error) => problem = Some(error.to_string()),
        }
    }
}

fn draw_top(
    frame: &mut ratatui::Frame,
    admin: &str,
    figures: Option<&Figures>,
    problem: Option<&str>,
) {
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Style, Stylize};
    use ratatui::text::Line;
    use ratatui::widgets::{Cell, Paragraph, Row, Table};

    let rows = figures.map(rows).unwrap_or_default();
    let [title, table, summary, _, footer] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(rows.len() as u16 + 1),
        Constraint::Length(3),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let heading = match figures {
        Some(f) => format!("ternd at {admin}, over {:.2} s, refreshed every second", f.interval_s),
        None => format!("ternd at {admin}: measuring the first second…"),
    };
    frame.render_widget(Paragraph::new(heading.bold()), title);
    if let Some(figures) = figures {
        let widths: Vec<Constraint> = (0..HEADINGS.len())
            .map(|i| {
                let widest = rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
                Constraint::Length(widest.max(HEADINGS[i].len()) as u16)
            })
            .collect();
        // Labels left, figures right-aligned, as in `ternctl stats`.
        let cells = |texts: Vec<String>| {
            texts.into_iter().enumerate().map(|(i, text)| {
                let line = Line::from(text);
                Cell::from(if i == 0 { line } else { line.right_aligned() })
            })
        };
        let total_row = rows.len() - 1;
        let body = rows.iter().enumerate().map(|(i, texts)| {
            let row = Row::new(cells(texts.to_vec()));
            if i == total_row {
                row.style(Style::new().bold())
            } else {
                row
            }
        });
        let header = Row::new(cells(HEADINGS.map(String::from).to_vec())).reversed();
        let view = Table::new(body, widths).header(header).column_spacing(2);
        frame.render_widget(view, table);
        // A blank line, then disk space and the totals since start.
        let lines = std::iter::once(String::new()).chain(summary_lines(figures));
        frame.render_widget(Paragraph::new(lines.map(Line::from).collect::<Vec<_>>()), summary);
    }
    let footer_line = match problem {
        Some(problem) => Line::from(format!("{problem} (retrying; q quits)").red()),
        None => Line::from("q, Esc or Ctrl-C quits".dim()),
    };
    frame.render_widget(Paragraph::new(footer_line), footer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape as ternd renders it: two cores, one shard each, a latency histogram.
    fn scrape_text(sent: [u64; 2], commits: [u64; 2], records: [u64; 2], le: [u64; 4]) -> String {
        format!(
            "# HELP tern_connections Open client connections.\n\
             # TYPE tern_connections gauge\n\
             tern_connections{{core=\"0\"}} 3\n\
             tern_connections{{core=\"1\"}} 4\n\
             # TYPE tern_messages_sent_total counter\n\
             tern_messages_sent_total{{core=\"0\"}} {}\n\
             tern_messages_sent_total{{core=\"1\"}} {}\n\
             tern_messages_delivered_total{{core=\"0\"}} 0\n\
             tern_messages_delivered_total{{core=\"1\"}} 0\n\
             tern_connections_accepted_total{{core=\"0\"}} 9\n\
             tern_connections_failed_total{{core=\"1\"}} 2\n\
             tern_commits_total{{shard=\"0\",core=\"0\"}} {}\n\
             tern_commits_total{{shard=\"1\",core=\"1\"}} {}\n\
             tern_committed_records_total{{shard=\"0\",core=\"0\"}} {}\n\
             tern_committed_records_total{{shard=\"1\",core=\"1\"}} {}\n\
             tern_disk_used_bytes{{shard=\"0\",core=\"0\"}} 1048576\n\
             tern_disk_used_bytes{{shard=\"1\",core=\"1\"}} 2097152\n\
             tern_disk_free_bytes 1000\n\
             tern_disk_size_bytes 4000\n\
             # TYPE tern_send_to_sent_seconds histogram\n\
             tern_send_to_sent_seconds_bucket{{core=\"0\",le=\"0.001\"}} {}\n\
             tern_send_to_sent_seconds_bucket{{core=\"0\",le=\"0.002\"}} {}\n\
             tern_send_to_sent_seconds_bucket{{core=\"0\",le=\"0.004\"}} {}\n\
             tern_send_to_sent_seconds_bucket{{core=\"0\",le=\"+Inf\"}} {}\n\
             tern_send_to_sent_seconds_sum{{core=\"0\"}} 0.1\n\
             tern_send_to_sent_seconds_count{{core=\"0\"}} {}\n",
            sent[0],
            sent[1],
            commits[0],
            commits[1],
            records[0],
            records[1],
            le[0],
            le[1],
            le[2],
            le[3],
            le[3]
        )
    }

    #[test]
    fn parses_names_labels_values_and_skips_comments() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\n\
                    a_total{core=\"0\",x=\"q\\\"\\\\\\n\"} 12\n\
                    b 1.5e3 1700000000000\n\nc{le=\"+Inf\"} +Inf\nd{} NaN\n";
        let samples = parse_metrics(text).unwrap();
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[0].name, "a_total");
        assert_eq!(samples[0].label("core"), Some("0"));
        assert_eq!(samples[0].label("x"), Some("q\"\\\n"));
        assert_eq!(samples[0].value, 12.0);
        assert_eq!((samples[1].name.as_str(), samples[1].value), ("b", 1500.0));
        assert!(samples[1].labels.is_empty());
        assert_eq!(samples[2].value, f64::INFINITY);
        assert_eq!(samples[2].label("le"), Some("+Inf"));
        assert!(samples[3].value.is_nan());
    }

    #[test]
    fn malformed_lines_are_named() {
        let cases = [
            ("ok 1\nbad{core=\"0\" 1\n", 2, "a label without a value"),
            ("x{core=\"0} 1", 1, "an unterminated label value"),
            ("x{core=0} 1", 1, "an unquoted label"),
            ("x{core=\"0\"}", 1, "a sample without a value"),
            ("x one", 1, "a bad value"),
            ("9x 1", 1, "a bad metric name"),
            ("x 1 2 3", 1, "text after the value"),
            ("x{a=\"\\t\"} 1", 1, "a bad escape in a label value"),
        ];
        for (text, line, what) in cases {
            assert_eq!(parse_metrics(text), Err(ParseError { line, what }), "{text:?}");
        }
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile() {
        let inf = f64::INFINITY;
        // 10 observations: 4 ≤ 1, 4 in (1, 2], 2 in (2, 4].
        let buckets = [(1.0, 4.0), (2.0, 8.0), (4.0, 10.0), (inf, 10.0)];
        assert_eq!(histogram_quantile(0.5, &buckets), Some(1.25));
        assert_eq!(histogram_quantile(0.2, &buckets), Some(0.5));
        assert_eq!(histogram_quantile(0.9, &buckets), Some(3.0));
        assert_eq!(histogram_quantile(1.0, &buckets), Some(4.0));
        // A rank in the +Inf bucket gives the highest finite bound.
        let beyond = [(1.0, 1.0), (2.0, 1.0), (inf, 10.0)];
        assert_eq!(histogram_quantile(0.99, &beyond), Some(2.0));
        // Nothing observed, or no +Inf bucket: no answer.
        assert_eq!(histogram_quantile(0.5, &[(1.0, 0.0), (inf, 0.0)]), None);
        assert_eq!(histogram_quantile(0.5, &[(1.0, 3.0), (2.0, 3.0)]), None);
        assert_eq!(histogram_quantile(0.5, &[]), None);
    }

    #[test]
    fn figures_per_core_from_two_scrapes() {
        let before =
            parse_metrics(&scrape_text([10, 20], [5, 0], [5, 0], [100, 100, 100, 100])).unwrap();
        // Over 2 s: core 0 took 20 sends, core 1 40; core 0 made 4 commits of 16 records;
        // 100 new sent ticks: 50 under 1 ms, 30 in (1, 2] ms, 20 in (2, 4] ms.
        let after =
            parse_metrics(&scrape_text([30, 60], [9, 0], [69, 0], [150, 180, 200, 200])).unwrap();
        let f = figures(&before, &after, Duration::from_secs(2));
        assert_eq!(f.interval_s, 2.0);
        let cores: Vec<&str> = f.cores.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(cores, ["0", "1"]);
        let (core0, core1) = (&f.cores[0].1, &f.cores[1].1);
        assert_eq!(core0.connections, 3.0);
        assert_eq!(core0.messages_in_per_s, 10.0);
        assert_eq!(core1.messages_in_per_s, 20.0);
        assert_eq!(core0.messages_out_per_s, 0.0);
        assert_eq!(core0.commit_batch_records, Some(16.0));
        assert_eq!(core1.commit_batch_records, None);
        let sent = core0.send_to_sent.unwrap();
        assert_eq!(sent.p50_s, 0.001);
        assert!((sent.p99_s - 0.0039).abs() < 1e-12, "{sent:?}");
        assert_eq!(core1.send_to_sent, None);
        assert_eq!(core0.disk_used_bytes, 1048576.0);
        assert_eq!(f.total.connections, 7.0);
        assert_eq!(f.total.messages_in_per_s, 30.0);
        assert_eq!(f.total.commit_batch_records, Some(16.0));
        assert_eq!(f.total.disk_used_bytes, 3.0 * 1048576.0);
        assert_eq!(f.total.send_to_sent, core0.send_to_sent);
        assert_eq!((f.disk_free_bytes, f.disk_size_bytes), (Some(1000.0), Some(4000.0)));
        let since = f.since_start;
        assert_eq!((since.messages_sent, since.connections_accepted), (90.0, 9.0));
        assert_eq!(since.connections_failed, 2.0);

        let table = render_stats("127.0.0.1:7401", &f);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("127.0.0.1:7401") && lines[0].contains("2.00 s"), "{table}");
        assert!(lines[1].contains("msgs in/s") && lines[1].contains("deliver p99"), "{table}");
        assert!(lines[2].starts_with("core 0") && lines[2].contains("1.00 ms"), "{table}");
        assert!(lines[2].ends_with("1.0 MiB"), "{table}");
        assert!(lines[3].starts_with("core 1") && lines[3].contains(" - "), "{table}");
        assert!(lines[4].starts_with("total") && lines[4].contains("30.0"), "{table}");
        assert_eq!(lines[5], "disk: 1000 B free of 3.9 KiB");
    }

    #[test]
    fn a_reset_counter_counts_from_zero_and_a_new_series_adds_nothing() {
        let before = parse_metrics(
            "tern_connections{core=\"0\"} 1\n\
             tern_messages_sent_total{core=\"0\"} 500\n",
        )
        .unwrap();
        let after = parse_metrics(
            "tern_connections{core=\"0\"} 1\n\
             tern_connections{core=\"1\"} 1\n\
             tern_messages_sent_total{core=\"0\"} 7\n\
             tern_messages_sent_total{core=\"1\"} 900\n",
        )
        .unwrap();
        let f = figures(&before, &after, Duration::from_secs(1));
        assert_eq!(f.cores[0].1.messages_in_per_s, 7.0);
        assert_eq!(f.cores[1].1.messages_in_per_s, 0.0);
        assert_eq!(f.total.messages_in_per_s, 7.0);
        assert_eq!(f.disk_free_bytes, None);
    }

    #[test]
    fn http_responses_other_than_200_are_refused() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nx 1\n";
        assert_eq!(metrics_body(ok), Ok("x 1\n"));
        let missing = b"HTTP/1.1 404 Not Found\r\n\r\nnope";
        assert_eq!(
            metrics_body(missing),
            Err("/metrics answered \"HTTP/1.1 404 Not Found\"".into())
        );
        assert!(metrics_body(b"SSH-2.0-OpenSSH").is_err());
    }

    #[test]
    fn units_read_well() {
        assert_eq!(seconds(0.000_85), "850 µs");
        assert_eq!(seconds(0.001_25), "1.25 ms");
        assert_eq!(seconds(2.5), "2.50 s");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(64.0 * 1024.0 * 1024.0), "64.0 MiB");
    }
}
