//! The report of `cnclip demo`: what the end-to-end run (synthetic corpus → training → features
//! → kNN → recall and zero-shot accuracy) measured, as files a person opens after the run.
//!
//! [`write`] puts into one folder an HTML page (self-contained apart from its images, so it opens
//! straight from disk in a browser), the same content as Markdown (readable in a terminal or a
//! code review), and one SVG line chart per [`Plot`]. The charts are drawn with `plotters`'
//! SVG backend only: SVG needs no fonts or bitmap libraries at build time (the browser lays out
//! the text), so the report costs the binary no system dependencies. Every file is written
//! atomically, the HTML last, so a report folder never holds a half-written file, nor an HTML
//! page whose pictures are missing.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cnclip_operators::storage;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One line of a chart: `(x, y)` points in drawing order; points that are not finite or beyond
/// ±[`LIMIT`] are skipped.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One line chart, written as `{file_stem}.svg` beside the report.
pub struct Plot {
    /// The SVG's file name without `.svg`: ASCII letters, digits, `-`, `_` and `.` (not first).
    pub file_stem: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// A table of text cells; short rows are padded with empty cells.
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

pub struct Report {
    pub title: String,
    /// One line each, shown as a list at the top.
    pub summary: Vec<String>,
    pub plots: Vec<Plot>,
    pub tables: Vec<Table>,
}

/// The largest magnitude drawn: the axis ranges' spans (padded) stay finite, which `plotters`
/// needs (its tick search never ends on an infinite span).
pub const LIMIT: f64 = 1e300;

fn drawable(&(x, y): &(f64, f64)) -> bool {
    x.abs() <= LIMIT && y.abs() <= LIMIT
}

/// The size of each chart, in SVG pixels.
const PLOT_SIZE: (u32, u32) = (800, 480);

/// Writes `dir/report.html`, `dir/report.md` and one `dir/{file_stem}.svg` per plot; returns the HTML's path.
pub fn write(dir: &Path, report: &Report) -> anyhow::Result<PathBuf> {
    let mut stems = HashSet::new();
    for plot in &report.plots {
        check_file_stem(&plot.file_stem)?;
        if !stems.insert(plot.file_stem.as_str()) {
            bail!("two plots of the report are both named {:?}", plot.file_stem);
        }
    }
    storage::create_dir_all(dir).with_context(|| format!("creating the report folder {}", dir.display()))?;
    for plot in &report.plots {
        let path = dir.join(format!("{}.svg", plot.file_stem));
        let svg = render_svg(plot).with_context(|| format!("drawing {}", path.display()))?;
        write_file(&path, &svg)?;
    }
    write_file(&dir.join("report.md"), &markdown(report))?;
    // Last: the page that links the others appears only once they are all in place.
    let html_path = dir.join("report.html");
    write_file(&html_path, &html(report))?;
    Ok(html_path)
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    cnclip_operators::write_atomically(path, |out| out.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// A stem that is one plain file name, safe unescaped in an HTML attribute and a Markdown link.
fn check_file_stem(stem: &str) -> anyhow::Result<()> {
    let plain = !stem.is_empty()
        && !stem.starts_with('.')
        && stem.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !plain || stem == "report" {
        bail!("plot file name {stem:?}: want ASCII letters, digits, '-', '_' or '.' (not first), and not \"report\"");
    }
    Ok(())
}

/// The axis ranges of a chart: the finite points' extent, the y axis padded by 5%; a range of
/// one value is widened around it. `None` without a finite point (the chart then says "no data"
/// over `0..1` on both axes).
fn axis_ranges(plot: &Plot) -> Option<((f64, f64), (f64, f64))> {
    let mut points = finite_points(plot).peekable();
    points.peek()?;
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let pad = |lo: f64, hi: f64, fraction: f64| {
        let span = hi - lo;
        if span > 0.0 {
            (lo - span * fraction, hi + span * fraction)
        } else {
            let half = (lo.abs() * 0.05).max(0.5);
            (lo - half, hi + half)
        }
    };
    Some((pad(x0, x1, 0.0), pad(y0, y1, 0.05)))
}

/// The corner of the plotting area the lines cross least (sampled along each segment), where the
/// legend hides the least: a falling loss curve leaves the upper right free, a rising recall the
/// lower right.
fn legend_corner(plot: &Plot, ((x0, x1), (y0, y1)): ((f64, f64), (f64, f64))) -> SeriesLabelPosition {
    const SAMPLES: usize = 8;
    // Each corner's box, in the plotting area's unit square (y up).
    let corners = [
        (SeriesLabelPosition::UpperRight, (0.55, 1.0), (0.6, 1.0)),
        (SeriesLabelPosition::LowerRight, (0.55, 1.0), (0.0, 0.4)),
        (SeriesLabelPosition::UpperLeft, (0.0, 0.45), (0.6, 1.0)),
        (SeriesLabelPosition::LowerLeft, (0.0, 0.45), (0.0, 0.4)),
    ];
    let mut hits = [0usize; 4];
    let unit = |(x, y): (f64, f64)| ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
    for series in &plot.series {
        let points: Vec<_> = series.points.iter().copied().filter(drawable).collect();
        let segments = points.windows(2).map(|w| (w[0], w[1])).chain(points.first().map(|&p| (p, p)));
        for ((ax, ay), (bx, by)) in segments {
            for k in 0..=SAMPLES {
                let t = k as f64 / SAMPLES as f64;
                let (u, v) = unit((ax + (bx - ax) * t, ay + (by - ay) * t));
                for (hit, (_, (u0, u1), (v0, v1))) in hits.iter_mut().zip(&corners) {
                    *hit += usize::from((*u0..=*u1).contains(&u) && (*v0..=*v1).contains(&v));
                }
            }
        }
    }
    let best = (0..corners.len()).min_by_key(|&i| hits[i]).unwrap_or(0);
    corners[best].0.clone()
}

fn finite_points(plot: &Plot) -> impl Iterator<Item = (f64, f64)> + '_ {
    plot.series.iter().flat_map(|s| s.points.iter().copied()).filter(drawable)
}

/// Draws one chart as an SVG document.
fn render_svg(plot: &Plot) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let ranges = axis_ranges(plot);
        let ((x0, x1), (y0, y1)) = ranges.unwrap_or(((0.0, 1.0), (0.0, 1.0)));
        let mut chart = ChartBuilder::on(&root)
            .caption(&plot.title, ("sans-serif", 26))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc(&plot.x_label)
            .y_desc(&plot.y_label)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()?;
        for (i, series) in plot.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points = series.points.iter().copied().filter(drawable);
            // Markers keep a series of a single point visible.
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(3))?
                .label(&series.name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        if ranges.is_none() {
            let style = TextStyle::from(("sans-serif", 24).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
            chart.plotting_area().draw(&Text::new("no data", (0.5, 0.5), style))?;
        }
        if !plot.series.is_empty() {
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 16))
                .position(legend_corner(plot, ((x0, x1), (y0, y1))))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// Escapes text for HTML element content and quoted attribute values.
fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

/// A table's rows (the header first), all padded to the widest row's length.
fn padded_rows(table: &Table) -> (usize, Vec<Vec<&str>>) {
    let width = table.rows.iter().map(Vec::len).chain([table.header.len()]).max().unwrap_or(0);
    let rows = std::iter::once(&table.header).chain(&table.rows);
    (width, rows.map(|row| row.iter().map(String::as_str).chain(std::iter::repeat("")).take(width).collect()).collect())
}

const CSS: &str = "body{font-family:system-ui,-apple-system,\"Segoe UI\",\"PingFang SC\",\"Noto Sans CJK SC\",\
sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222;line-height:1.5}\
figure{margin:1.5em 0}img{max-width:100%;height:auto;border:1px solid #ddd}\
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}\
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}";

fn html(report: &Report) -> String {
    let mut out = String::new();
    let title = html_escape(&report.title);
    // `write!` into a String cannot fail.
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
    );
    if !report.summary.is_empty() {
        out.push_str("<ul>\n");
        for line in &report.summary {
            let _ = writeln!(out, "<li>{}</li>", html_escape(line));
        }
        out.push_str("</ul>\n");
    }
    for plot in &report.plots {
        let title = html_escape(&plot.title);
        let _ = writeln!(
            out,
            "<figure>\n<img src=\"{}.svg\" alt=\"{title}\">\n<figcaption>{title}</figcaption>\n</figure>",
            html_escape(&plot.file_stem)
        );
    }
    for table in &report.tables {
        let _ = writeln!(out, "<h2>{}</h2>", html_escape(&table.title));
        let (width, rows) = padded_rows(table);
        if width == 0 {
            out.push_str("<p>(empty)</p>\n");
            continue;
        }
        out.push_str("<table>\n");
        for (i, row) in rows.iter().enumerate() {
            let tag = if i == 0 { "th" } else { "td" };
            out.push_str("<tr>");
            for cell in row {
                let _ = write!(out, "<{tag}>{}</{tag}>", html_escape(cell));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// Text on one Markdown line: line breaks become spaces, and the characters that would start
/// markup (code, emphasis, HTML, links) are backslash-escaped, so a renderer shows them as typed.
fn md_line(text: &str) -> String {
    md_escape(text, "\\`*<>[]")
}

/// A Markdown table cell: [`md_line`], and pipes escaped too.
fn md_cell(text: &str) -> String {
    md_escape(text, "\\`*<>[]|")
}

fn md_escape(text: &str, special: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\r' | '\n' => out.push(' '),
            c if special.contains(c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {}\n", md_line(&report.title));
    for line in &report.summary {
        let _ = writeln!(out, "- {}", md_line(line));
    }
    if !report.summary.is_empty() {
        out.push('\n');
    }
    for plot in &report.plots {
        let alt = md_line(&plot.title);
        let _ = writeln!(out, "![{alt}]({}.svg)\n", plot.file_stem);
    }
    for table in &report.tables {
        let _ = writeln!(out, "## {}\n", md_line(&table.title));
        let (width, rows) = padded_rows(table);
        if width == 0 {
            out.push_str("(empty)\n\n");
            continue;
        }
        for (i, row) in rows.iter().enumerate() {
            let cells: Vec<String> = row.iter().map(|c| md_cell(c)).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
            if i == 0 {
                let _ = writeln!(out, "|{}", " --- |".repeat(width));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            title: "演示报告 <demo>".into(),
            summary: vec!["图文检索 R@1 = 0.5 & 零样本 = 0.25".into()],
            plots: vec![
                Plot {
                    file_stem: "loss".into(),
                    title: "训练损失".into(),
                    x_label: "步数".into(),
                    y_label: "损失".into(),
                    series: vec![
                        Series { name: "训练集".into(), points: vec![(0.0, 2.0), (1.0, 1.5), (2.0, 1.0)] },
                        Series { name: "验证集".into(), points: vec![(0.0, 2.2), (2.0, f64::NAN), (2.0, 1.2)] },
                    ],
                },
                Plot {
                    file_stem: "empty".into(),
                    title: "空图".into(),
                    x_label: "x".into(),
                    y_label: "y".into(),
                    series: vec![],
                },
            ],
            tables: vec![Table {
                title: "召回率".into(),
                header: vec!["任务".into(), "R@1".into()],
                rows: vec![vec!["a<b".into(), "x|y".into()], vec!["短行".into()]],
            }],
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    /// The document's text nodes, concatenated per `<text>` element.
    fn svg_texts(doc: &roxmltree::Document<'_>) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| {
                n.descendants().filter(|t| t.is_text()).filter_map(|t| t.text()).collect::<String>().trim().to_owned()
            })
            .collect()
    }

    #[test]
    fn writes_html_markdown_and_svgs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested/report");
        let report = report();
        let html_path = write(&out, &report).unwrap();
        assert_eq!(html_path, out.join("report.html"));

        let html = read(&html_path);
        assert!(html.contains("<meta charset=\"utf-8\">"));
        assert!(html.contains("<title>演示报告 &lt;demo&gt;</title>"), "{html}");
        assert!(html.contains("<li>图文检索 R@1 = 0.5 &amp; 零样本 = 0.25</li>"), "{html}");
        for plot in &report.plots {
            let reference = format!("<img src=\"{}.svg\"", plot.file_stem);
            assert!(html.contains(&reference), "{reference} not in {html}");
            assert!(out.join(format!("{}.svg", plot.file_stem)).is_file());
        }
        assert!(html.contains("<td>a&lt;b</td><td>x|y</td>"), "{html}");
        assert!(!html.contains("a<b"));
        assert!(html.contains("<tr><td>短行</td><td></td></tr>"), "{html}");

        let md = read(&out.join("report.md"));
        assert!(md.starts_with("# 演示报告 \\<demo\\>\n"), "{md}");
        assert!(md.contains("![训练损失](loss.svg)"), "{md}");
        assert!(md.contains("| 任务 | R@1 |\n| --- | --- |\n| a\\<b | x\\|y |\n| 短行 |  |\n"), "{md}");

        // No temporary file left behind.
        let mut names: Vec<String> =
            std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["empty.svg", "loss.svg", "report.html", "report.md"]);
    }

    #[test]
    fn svgs_are_well_formed_with_lines_and_legends() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &report()).unwrap();

        let loss = read(&dir.path().join("loss.svg"));
        let doc = roxmltree::Document::parse(&loss).unwrap_or_else(|e| panic!("loss.svg: {e}\n{loss}"));
        assert!(doc.root_element().has_tag_name("svg"));
        let texts = svg_texts(&doc);
        for text in ["训练损失", "步数", "损失", "训练集", "验证集"] {
            assert!(texts.iter().any(|t| t == text), "{text:?} not among {texts:?}");
        }
        // Per series (told apart by its palette colour): its line through the finite points, then
        // its legend sample; the NaN point is skipped, not drawn.
        let lines_of = |series: usize| {
            let (r, g, b) = Palette99::pick(series).rgb();
            let stroke = format!("#{r:02X}{g:02X}{b:02X}");
            doc.descendants()
                .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(stroke.as_str()))
                .map(|n| n.attribute("points").unwrap_or_default().split_whitespace().count())
                .collect::<Vec<_>>()
        };
        assert_eq!(lines_of(0), [3, 2], "{loss}");
        assert_eq!(lines_of(1), [2, 2], "{loss}");
        assert_eq!(lines_of(2), [0; 0], "{loss}");
        assert!(!loss.contains("NaN"));

        let empty = read(&dir.path().join("empty.svg"));
        let doc = roxmltree::Document::parse(&empty).unwrap_or_else(|e| panic!("empty.svg: {e}\n{empty}"));
        let texts = svg_texts(&doc);
        assert!(texts.iter().any(|t| t == "no data"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "空图"), "{texts:?}");
        assert!(!empty.contains("NaN") && !empty.contains("inf"));
    }

    #[test]
    fn degenerate_plots_have_finite_ranges() {
        let plot = |points: Vec<(f64, f64)>| Plot {
            file_stem: "p".into(),
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            series: vec![Series { name: "s".into(), points }],
        };
        assert_eq!(axis_ranges(&plot(vec![])), None);
        assert_eq!(axis_ranges(&plot(vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)])), None);
        assert_eq!(axis_ranges(&plot(vec![(3.0, 10.0)])), Some(((2.5, 3.5), (9.5, 10.5))));
        assert_eq!(axis_ranges(&plot(vec![(0.0, 0.0), (2.0, 10.0)])), Some(((0.0, 2.0), (-0.5, 10.5))));
        // A series of one point and one of none still draw (marker, legend) without failing.
        let mut one = plot(vec![(1.0, 0.25)]);
        one.series.push(Series { name: "空".into(), points: vec![] });
        let svg = render_svg(&one).unwrap();
        roxmltree::Document::parse(&svg).unwrap();
        assert!(svg.contains("<circle"), "{svg}");
        assert!(!svg.contains("NaN"));
        // Beyond the limit is skipped like NaN (plotters hangs on a span that overflows).
        assert_eq!(axis_ranges(&plot(vec![(-f64::MAX, 0.0), (0.0, f64::MAX)])), None);
        let huge = plot(vec![(-LIMIT, -LIMIT), (LIMIT, LIMIT), (f64::MAX, 0.0)]);
        let pad = 2.0 * LIMIT * 0.05;
        assert_eq!(axis_ranges(&huge), Some(((-LIMIT, LIMIT), (-LIMIT - pad, LIMIT + pad))));
        // On a thread: a hang fails the test instead of stalling the suite.
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(render_svg(&huge).map_err(|e| e.to_string())));
        let svg = result.recv_timeout(std::time::Duration::from_secs(60)).expect("drawing ±1e300 hangs").unwrap();
        roxmltree::Document::parse(&svg).unwrap();
        assert!(!svg.contains("NaN"), "{svg}");
    }

    #[test]
    fn legend_goes_where_the_lines_are_not() {
        let plot = |points: Vec<(f64, f64)>| Plot {
            file_stem: "p".into(),
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            series: vec![Series { name: "s".into(), points }],
        };
        let corner = |p: &Plot| legend_corner(p, axis_ranges(p).unwrap());
        let falling = plot((0..10).map(|i| (i as f64, 10.0 - i as f64)).collect());
        assert_eq!(corner(&falling), SeriesLabelPosition::UpperRight);
        let rising = plot(vec![(0.0, 0.0), (1.0, 1.0)]);
        assert_eq!(corner(&rising), SeriesLabelPosition::LowerRight);
        let mut across_top = plot(vec![(0.0, 0.0), (1.0, 1.0)]);
        across_top.series.push(Series { name: "t".into(), points: vec![(0.0, 1.0), (1.0, 1.0)] });
        assert_eq!(corner(&across_top), SeriesLabelPosition::LowerRight);
        let across_bottom = plot(vec![(0.0, 1.0), (0.5, 0.0), (1.0, 0.0)]);
        assert_eq!(corner(&across_bottom), SeriesLabelPosition::UpperRight);
    }

    #[test]
    fn rejects_unsafe_or_duplicate_file_stems() {
        let dir = tempfile::tempdir().unwrap();
        for stem in ["../x", "a/b", "", ".hidden", "report", "a b"] {
            let mut r = report();
            r.plots[0].file_stem = stem.into();
            assert!(write(dir.path(), &r).is_err(), "{stem:?} accepted");
        }
        let mut r = report();
        r.plots[1].file_stem = "loss".into();
        assert!(write(dir.path(), &r).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written for a bad report");
    }
}
