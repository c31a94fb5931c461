//! The comparison as a web page: the verdicts, the seed's table with each candidate row marked
//! by its verdict, the divergences, and per endpoint the latency distribution of every version
//! as an inline SVG chart. One self-contained document: no script, style or font is fetched
//! from anywhere. The agent serves it on `/` and refreshes it in place; `mirror-agent report
//! --prometheus --html` writes the fleet's.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::histogram::SeriesHistogram;
use super::report::Report;
use super::verdict::{verdict_lines, VerdictKind};
use super::Side;

/// What a page shows besides the comparison.
pub struct Page<'a> {
    pub title: &'a str,
    /// Lines under the title: where the figures come from, over which window.
    pub about: Vec<String>,
    pub report: &'a Report,
    pub hists: &'a [SeriesHistogram],
    /// Other pages to go to: (text, relative address), e.g. each declared mirroring's.
    pub links: Vec<(String, String)>,
    /// Reload the figures in place every this many seconds (the agent's live page).
    pub refresh_s: Option<u32>,
}

/// One colour per version, live first.
const COLOURS: [&str; 8] = [
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#b279a2", "#72b7b2", "#9d755d", "#bab0ac",
];

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:24px;color:#222}\
h1{font-size:20px;margin:0}.about{color:#666;margin:4px 0 16px}\
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;text-align:right;border-bottom:1px solid #eee}\
td:first-child,td:nth-child(2),th:first-child,th:nth-child(2){text-align:left}\
tr.mirror td{background:#fafafa}tr.fails td{background:#fdd}tr.differs td{background:#ffe6cc}\
tr.content td{background:#eee0ff}tr.slower td{background:#fff3b0}\
ul.verdicts li.fails{color:#b00}ul.verdicts li.slower{color:#8a6d00}ul.verdicts li.match{color:#270}\
.charts{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0;border:1px solid #ddd;padding:8px}\
figcaption{font-weight:600;margin-bottom:4px}.empty{color:#b00;font-weight:600}";

/// The page, complete.
pub fn html(page: &Page) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>",
        esc(page.title)
    );
    out.push_str(&body(page));
    if let Some(s) = page.refresh_s {
        let _ = write!(out, "<script>{}</script>", refresh_script(s));
    }
    out.push_str("</body></html>\n");
    out
}

/// What the refresh replaces: everything inside `<main>`.
fn body(page: &Page) -> String {
    let r = page.report;
    let mut out = String::from("<main id=\"figures\">");
    let _ = write!(out, "<h1>{}</h1>", esc(page.title));
    for line in &page.about {
        let _ = write!(out, "<div class=\"about\">{}</div>", esc(line));
    }
    if !page.links.is_empty() {
        out.push_str("<nav>");
        for (text, href) in &page.links {
            let _ = write!(out, "<a href=\"{}\">{}</a> ", esc(href), esc(text));
        }
        out.push_str("</nav>");
    }
    if r.rows.is_empty() {
        out.push_str("<p class=\"empty\">No request has been compared yet: the table fills as the live service answers requests and the candidates answer their copies.</p></main>");
        return out;
    }
    out.push_str("<h2>Verdicts</h2><ul class=\"verdicts\">");
    for (kind, line) in verdict_lines(r) {
        let class = kind.map_or("pending", kind_word);
        let _ = write!(out, "<li class=\"{class}\">{}</li>", esc(&line));
    }
    out.push_str("</ul>");
    table(&mut out, r);
    divergences(&mut out, r);
    out.push_str("<h2>Latency by endpoint</h2><div class=\"charts\">");
    let versions = versions(r);
    for (name, series) in by_endpoint(page.hists) {
        chart(&mut out, name, &series, &versions);
    }
    out.push_str("</div></main>");
    out
}

/// The seed's table; a candidate's row carries its endpoint verdict as a class.
fn table(out: &mut String, r: &Report) {
    let verdict: BTreeMap<(&str, &str), VerdictKind> = r
        .verdicts
        .iter()
        .map(|v| ((v.name.as_str(), v.mirror.as_str()), v.verdict))
        .collect();
    let mut rows = r.rows.clone();
    rows.sort_by(|a, b| {
        (&a.name, a.side, &a.version, &a.code).cmp(&(&b.name, b.side, &b.version, &b.code))
    });
    out.push_str("<h2>Requests</h2><table id=\"table\"><tr><th>name</th><th>podVersion</th><th>resultCode</th><th>duration (ms)</th><th>requestCount</th><th>p50 (ms)</th><th>p99 (ms)</th></tr>");
    for x in &rows {
        let class = match (x.side, verdict.get(&(x.name.as_str(), x.version.as_str()))) {
            (Side::Live, _) => "live".to_string(),
            (Side::Mirror, Some(k)) => format!("mirror {}", kind_word(*k)),
            (Side::Mirror, None) => "mirror".to_string(),
        };
        let _ = write!(
            out,
            "<tr class=\"{class}\" data-endpoint=\"{}\" data-version=\"{}\" data-code=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td></tr>",
            esc(&x.name),
            esc(&x.version),
            esc(&x.code),
            esc(&x.name),
            esc(&x.version),
            esc(&x.code),
            x.avg_ms,
            x.count,
            x.p50_ms,
            x.p99_ms
        );
    }
    out.push_str("</table>");
}

fn kind_word(k: VerdictKind) -> &'static str {
    match k {
        VerdictKind::Fails => "fails",
        VerdictKind::Differs => "differs",
        VerdictKind::Content => "content",
        VerdictKind::Slower => "slower",
        VerdictKind::Match => "match",
    }
}

/// Status mismatches and content regressions.
fn divergences(out: &mut String, r: &Report) {
    if !r.mismatches.is_empty() {
        out.push_str("<h2>Status mismatches (live → candidate)</h2><ul id=\"mismatches\">");
        for m in &r.mismatches {
            let _ = write!(
                out,
                "<li>{} {}: {} → {} ×{}</li>",
                esc(&m.name),
                esc(&m.mirror),
                esc(&m.live_code),
                esc(&m.mirror_code),
                m.count
            );
        }
        out.push_str("</ul>");
    }
    let regressions: Vec<String> = r
        .content
        .iter()
        .flat_map(|c| {
            c.fields.iter().filter(|f| f.regression).map(move |f| {
                format!(
                    "{} {}: {} differs in {:.0}% (noise {:.0}%)",
                    c.name,
                    c.mirror,
                    f.path,
                    f.rate * 100.0,
                    f.noise_rate * 100.0
                )
            })
        })
        .collect();
    if !regressions.is_empty() {
        out.push_str("<h2>Content regressions</h2><ul id=\"content\">");
        for line in regressions {
            let _ = write!(out, "<li>{}</li>", esc(&line));
        }
        out.push_str("</ul>");
    }
}

/// Every version in the table, live ones first, for stable colours.
fn versions(r: &Report) -> Vec<String> {
    let mut v: Vec<(Side, String)> = r.rows.iter().map(|x| (x.side, x.version.clone())).collect();
    v.sort();
    v.dedup();
    v.into_iter().map(|(_, name)| name).collect()
}

/// Per version: (upper bound, count) per bucket.
type Versions<'a> = BTreeMap<&'a str, Vec<(f64, u64)>>;

/// Per endpoint, per version: the buckets of all its codes together.
fn by_endpoint(hists: &[SeriesHistogram]) -> BTreeMap<&str, Versions<'_>> {
    let mut out: BTreeMap<&str, Versions<'_>> = BTreeMap::new();
    for h in hists.iter().filter(|h| h.count > 0) {
        let v = out
            .entry(h.name.as_str())
            .or_default()
            .entry(h.version.as_str())
            .or_default();
        if v.is_empty() {
            v.clone_from(&h.buckets);
        } else {
            for (slot, (_, n)) in v.iter_mut().zip(&h.buckets) {
                slot.1 += n;
            }
        }
    }
    out
}

/// One endpoint's chart: per bucket, each version's share of its requests as a bar.
fn chart(out: &mut String, name: &str, series: &Versions, versions: &[String]) {
    let Some(bounds) = series.values().next().map(|b| b.len()) else {
        return;
    };
    // Only the buckets that hold something, and one either side.
    let used: Vec<usize> = (0..bounds)
        .filter(|&i| series.values().any(|b| b.get(i).is_some_and(|x| x.1 > 0)))
        .collect();
    let (Some(&lo), Some(&hi)) = (used.first(), used.last()) else {
        return;
    };
    let (lo, hi) = (lo.saturating_sub(1), (hi + 1).min(bounds - 1));
    let (slot, bar, height, top) = (46.0, 40.0 / series.len().max(1) as f64, 120.0, 10.0);
    let legend_width: f64 = series.keys().map(|v| legend_step(v)).sum::<f64>() + 40.0;
    let width = (slot * (hi - lo + 1) as f64 + 50.0).max(legend_width);
    let _ = write!(
        out,
        "<figure class=\"chart\" data-endpoint=\"{}\"><figcaption>{}</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{:.0}\" role=\"img\">",
        esc(name),
        esc(name),
        height + top + 40.0
    );
    for (k, (version, buckets)) in series.iter().enumerate() {
        let total: u64 = buckets.iter().map(|b| b.1).sum::<u64>().max(1);
        let colour = colour_of(version, versions);
        for i in lo..=hi {
            let share = buckets.get(i).map_or(0, |b| b.1) as f64 / total as f64;
            let h = share * height;
            let x = 40.0 + slot * (i - lo) as f64 + bar * k as f64;
            let _ = write!(
                out,
                "<rect class=\"bar\" data-version=\"{}\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{colour}\"><title>{} {}: {:.0}%</title></rect>",
                esc(version),
                top + height - h,
                bar - 1.0,
                esc(version),
                bucket_label(buckets, i),
                share * 100.0
            );
        }
    }
    axis(out, series, lo, hi, slot, top + height);
    legend(out, series, versions, top + height + 34.0);
    out.push_str("</svg></figure>");
}

/// The bucket bounds under the bars.
fn axis(out: &mut String, series: &Versions, lo: usize, hi: usize, slot: f64, y: f64) {
    let Some(buckets) = series.values().next() else {
        return;
    };
    let _ = write!(
        out,
        "<line x1=\"38\" y1=\"{y}\" x2=\"{:.0}\" y2=\"{y}\" stroke=\"#999\"/><text x=\"0\" y=\"{:.0}\" font-size=\"10\">share</text>",
        40.0 + slot * (hi - lo + 1) as f64,
        y - 110.0
    );
    for i in lo..=hi {
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.0}\" font-size=\"10\">{}</text>",
            40.0 + slot * (i - lo) as f64,
            y + 14.0,
            bucket_label(buckets, i)
        );
    }
}

/// The versions' colours, under the axis.
fn legend(out: &mut String, series: &Versions, versions: &[String], y: f64) {
    let mut x = 40.0;
    for version in series.keys() {
        let _ = write!(
            out,
            "<rect x=\"{x:.0}\" y=\"{:.0}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.0}\" y=\"{y:.0}\" font-size=\"11\">{}</text>",
            y - 9.0,
            colour_of(version, versions),
            x + 14.0,
            esc(version)
        );
        x += legend_step(version);
    }
}

/// The room a version's legend entry takes: its swatch and its name.
fn legend_step(version: &str) -> f64 {
    22.0 + 7.0 * version.chars().count() as f64
}

fn colour_of(version: &str, versions: &[String]) -> &'static str {
    let i = versions.iter().position(|v| v == version).unwrap_or(0);
    COLOURS[i % COLOURS.len()]
}

/// `≤2.5ms`, `≤1s`, `>30s`.
fn bucket_label(buckets: &[(f64, u64)], i: usize) -> String {
    match buckets.get(i).map(|b| b.0) {
        Some(le) if le.is_infinite() => {
            let last = i
                .checked_sub(1)
                .and_then(|j| buckets.get(j))
                .map_or(0.0, |b| b.0);
            format!(">{}", seconds(last))
        }
        Some(le) => format!("≤{}", seconds(le)),
        None => String::new(),
    }
}

fn seconds(s: f64) -> String {
    if s < 1e-3 {
        format!("{}µs", (s * 1e6).round())
    } else if s < 1.0 {
        format!("{}ms", (s * 1e3 * 10.0).round() / 10.0)
    } else {
        format!("{s}s")
    }
}

/// Reloads the figures in place; says when the agent stopped answering rather than showing
/// stale numbers as current.
fn refresh_script(seconds: u32) -> String {
    format!(
        "setInterval(async()=>{{const m=document.getElementById('figures');try{{const r=await fetch(location.href,{{cache:'no-store'}});if(!r.ok)throw new Error('HTTP '+r.status);const d=new DOMParser().parseFromString(await r.text(),'text/html');m.replaceWith(d.getElementById('figures'));document.body.dataset.refreshed=(+document.body.dataset.refreshed||0)+1;}}catch(e){{let s=document.getElementById('stale');if(!s){{s=document.createElement('p');s.id='stale';s.className='empty';document.body.prepend(s);}}s.textContent='The agent does not answer ('+e.message+'): the figures below are from '+new Date(Date.now()-{ms}).toLocaleTimeString()+' or before.';return;}}const s=document.getElementById('stale');if(s)s.remove();}},{ms});",
        ms = u64::from(seconds) * 1000
    )
}

/// Text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::{judge, Mismatch, Paired, Row};

    fn row(name: &str, version: &str, side: Side, code: &str, avg_ms: f64) -> Row {
        Row {
            name: name.into(),
            version: version.into(),
            side,
            code: code.into(),
            count: 10,
            timed: 10,
            avg_ms,
            p50_ms: avg_ms,
            p99_ms: avg_ms,
        }
    }

    fn page(report: &Report, hists: &[SeriesHistogram]) -> String {
        html(&Page {
            title: "t",
            about: vec!["from <here>".into()],
            report,
            hists,
            links: Vec::new(),
            refresh_s: None,
        })
    }

    #[test]
    fn an_empty_comparison_says_why_it_is_empty() {
        let out = page(&Report::default(), &[]);
        assert!(out.contains("No request has been compared yet"), "{out}");
        assert!(!out.contains("<table"), "{out}");
        assert!(out.contains("from &lt;here&gt;"), "{out}");
    }

    #[test]
    fn candidate_rows_carry_their_verdict_and_each_endpoint_has_a_chart() {
        let mut r = Report {
            rows: vec![
                row("GET /a<b>", "V1", Side::Live, "200", 5.0),
                row("GET /a<b>", "V3", Side::Mirror, "200", 300.0),
                row("GET /c", "V1", Side::Live, "200", 1.0),
                row("GET /c", "V3", Side::Mirror, "500", 1.0),
            ],
            mismatches: vec![Mismatch {
                name: "GET /c".into(),
                mirror: "V3".into(),
                live_code: "200".into(),
                mirror_code: "500".into(),
                count: 10,
            }],
            paired: ["GET /a<b>", "GET /c"]
                .map(|name| Paired {
                    name: name.into(),
                    mirror: "V3".into(),
                    count: 10,
                })
                .into(),
            mirrors: vec!["V3".into()],
            ..Report::default()
        };
        r.verdicts = judge(&r);
        let hist = |name: &str, version: &str| SeriesHistogram {
            name: name.into(),
            version: version.into(),
            code: "200".into(),
            sum_seconds: 1.0,
            count: 10,
            buckets: vec![(0.001, 4), (0.01, 6), (f64::INFINITY, 0)],
        };
        let hists = [
            hist("GET /a<b>", "V1"),
            hist("GET /a<b>", "V3"),
            hist("GET /c", "V1"),
        ];
        let out = page(&r, &hists);
        assert!(
            out.contains(
                "<tr class=\"mirror slower\" data-endpoint=\"GET /a&lt;b&gt;\" data-version=\"V3\""
            ),
            "{out}"
        );
        assert!(
            out.contains("<tr class=\"mirror fails\" data-endpoint=\"GET /c\""),
            "{out}"
        );
        assert_eq!(out.matches("<figure class=\"chart\"").count(), 2);
        assert!(out.contains("<li class=\"fails\">"), "{out}");
        assert!(out.contains("<title>V3 ≤10ms: 60%</title>"), "{out}");
        assert!(!out.contains("<script>"), "a file page has no refresh");
    }
}
