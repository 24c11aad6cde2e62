//! A computed report as text: CSV (RFC 4180, a header row, `.` decimals)
//! and one self-contained HTML page whose charts are inline SVG drawn
//! here, so a mail client or an archive shows it with no network and no
//! script.

use crate::content::{Cell, Chart, Content};
use std::fmt::Write;

/// The table as CSV.
pub fn csv(c: &Content) -> String {
    let mut out = String::new();
    let header: Vec<String> = c.columns.iter().map(|h| csv_field(h)).collect();
    out.push_str(&header.join(","));
    out.push_str("\r\n");
    for row in &c.rows {
        let fields: Vec<String> = row.iter().map(|v| csv_field(&cell_text(v))).collect();
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

fn cell_text(c: &Cell) -> String {
    match c {
        Cell::Text(s) => s.clone(),
        Cell::Int(i) => i.to_string(),
        Cell::Num(v, d) if v.is_finite() => format!("{v:.*}", d),
        Cell::Num(..) => String::new(),
    }
}

/// Quoted when it holds a separator, a quote or a line break. A leading
/// `=`, `+`, `-` or `@` of text is prefixed with `'` so a spreadsheet does
/// not run a device-chosen name as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '@']) || (s.starts_with('-') && s.parse::<f64>().is_err()) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Text for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
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

/// Bars drawn per chart at most (the table has every row).
const MAX_BARS: usize = 40;

/// A horizontal bar chart as an SVG element.
pub fn bar_chart(ch: &Chart) -> String {
    let bars = &ch.bars[..ch.bars.len().min(MAX_BARS)];
    let (label_w, bar_w, value_w, row_h) = (180.0, 360.0, 110.0, 20.0);
    let width = label_w + bar_w + value_w;
    let height = row_h * bars.len().max(1) as f64 + 8.0;
    let max = bars
        .iter()
        .map(|b| b.1)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12"><title>{}</title>"#,
        escape(&ch.title)
    );
    if bars.is_empty() {
        let _ = write!(s, r##"<text x="4" y="16" fill="#666">no data</text>"##);
    }
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = 4.0 + row_h * i as f64;
        let w = if max > 0.0 && v.is_finite() && *v > 0.0 {
            (v / max * bar_w).max(1.0)
        } else {
            0.0
        };
        let shown: String = label.chars().take(28).collect();
        let _ = write!(
            s,
            r##"<text x="{lx}" y="{ty}" text-anchor="end">{}</text><rect x="{label_w}" y="{ry}" width="{w:.1}" height="{bh}" fill="#2f6fb3"/><text x="{vx:.1}" y="{ty}">{}</text>"##,
            escape(&shown),
            escape(&format!("{} {}", number(*v), ch.unit)),
            lx = label_w - 6.0,
            ty = y + 13.0,
            ry = y + 2.0,
            bh = row_h - 4.0,
            vx = label_w + w + 4.0,
        );
    }
    s.push_str("</svg>");
    s
}

fn number(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The whole report as one HTML page.
pub fn html(c: &Content, report_name: &str, period: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{name} — {period}</title><style>body{{font-family:sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;margin-top:12px}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}th{{background:#f0f0f0;text-align:left}}td.n{{text-align:right}}dl{{display:grid;grid-template-columns:max-content auto;gap:2px 12px}}dt{{color:#666}}dd{{margin:0}}h2{{font-size:16px;margin-top:24px}}</style></head><body><h1>{name}</h1><p>{title}, {period}</p><dl>"#,
        name = escape(report_name),
        title = escape(&c.title),
        period = escape(period),
    );
    for (k, v) in &c.summary {
        let _ = write!(s, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(v));
    }
    s.push_str("</dl>");
    for ch in &c.charts {
        let _ = write!(s, "<h2>{}</h2>{}", escape(&ch.title), bar_chart(ch));
        if ch.bars.len() > MAX_BARS {
            let _ = write!(
                s,
                "<p>The first {MAX_BARS} of {}; the table has all.</p>",
                ch.bars.len()
            );
        }
    }
    s.push_str("<h2>Data</h2><table><thead><tr>");
    for h in &c.columns {
        let _ = write!(s, "<th>{}</th>", escape(h));
    }
    s.push_str("</tr></thead><tbody>");
    for row in &c.rows {
        s.push_str("<tr>");
        for cell in row {
            let class = if matches!(cell, Cell::Text(_)) {
                ""
            } else {
                r#" class="n""#
            };
            let _ = write!(s, "<td{class}>{}</td>", escape(&cell_text(cell)));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table></body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let c = Content {
            title: "t".into(),
            columns: vec!["a", "b"],
            rows: vec![vec![
                Cell::Text("x,\"y\"".into()),
                Cell::Text("=cmd()".into()),
            ]],
            charts: vec![],
            summary: vec![],
        };
        assert_eq!(csv(&c), "a,b\r\n\"x,\"\"y\"\"\",'=cmd()\r\n");
    }

    #[test]
    fn html_escapes_and_embeds_svg_without_external_resources() {
        let c = Content {
            title: "t".into(),
            columns: vec!["device"],
            rows: vec![vec![Cell::Text("<script>".into())]],
            charts: vec![Chart {
                title: "c".into(),
                unit: "kWh".into(),
                bars: vec![("<b>".into(), 2.0), ("z".into(), 1.0)],
            }],
            summary: vec![],
        };
        let h = html(&c, "r", "p");
        assert!(!h.contains("<script>") && !h.contains("<b>"));
        assert!(h.contains("<svg") && h.contains("&lt;script&gt;"));
        assert!(!h.contains("src=") && !h.contains("href="), "{h}");
    }
}
