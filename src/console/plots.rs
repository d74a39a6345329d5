//! The overview's plots: each sink's delivered, retried and dead attempts and the
//! webhooks by outcome over the last hour and day, drawn as SVG by the server from the
//! in-memory history (no script, no style attribute: the console's CSP allows neither).

use maud::{Markup, html};

use crate::history::{self, History};

const WIDTH: u64 = 360;
const HEIGHT: u64 = 80;
/// The last hour, a point a minute; the last day, a point every 15 minutes.
const SPANS: [(&str, usize, usize); 2] = [("last hour", 60, 1), ("last day", 96, 15)];

/// One line of a plot: its name, its colour, and its count per minute over the last day.
struct Line {
    label: &'static str,
    colour: &'static str,
    minutes: Vec<u64>,
}

/// The plots of one sink's attempts.
pub(super) fn sink(history: &History, name: &str) -> Markup {
    let lines = history::SINK_OUTCOMES
        .iter()
        .zip(["#17703a", "#8a5a00", "#b3261e"])
        .map(|(outcome, colour)| Line {
            label: outcome,
            colour,
            minutes: history.last(&history::sink(name, outcome), history::MINUTES),
        })
        .collect::<Vec<_>>();
    spans(&lines)
}

/// The plots of the webhooks taken in: accepted, duplicates, and refused.
pub(super) fn webhooks(history: &History) -> Markup {
    let lines = history::WEBHOOK_KINDS
        .iter()
        .zip(["#17703a", "#5b6475", "#b3261e"])
        .map(|(kind, colour)| Line {
            label: kind,
            colour,
            minutes: history.last(&history::webhooks(kind), history::MINUTES),
        })
        .collect::<Vec<_>>();
    spans(&lines)
}

/// The hour's plot and the day's, side by side.
fn spans(lines: &[Line]) -> Markup {
    html! {
        div.plots {
            @for (title, points, per_point) in SPANS {
                (plot(title, lines, points, per_point))
            }
        }
    }
}

/// One SVG: `points` points of `per_point` minutes each, the newest on the right, scaled
/// to the largest; each line's total over the span in the legend.
fn plot(title: &str, lines: &[Line], points: usize, per_point: usize) -> Markup {
    let buckets: Vec<Vec<u64>> = lines
        .iter()
        .map(|line| {
            let span = &line.minutes[line.minutes.len().saturating_sub(points * per_point)..];
            span.chunks(per_point).map(|c| c.iter().sum()).collect()
        })
        .collect();
    let top = buckets.iter().flatten().copied().max().unwrap_or(0).max(1);
    let step = WIDTH as f64 / (points.max(2) - 1) as f64;
    let polyline = |values: &[u64]| -> String {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let y = HEIGHT as f64 - (*v as f64 / top as f64) * (HEIGHT - 4) as f64 - 2.0;
                format!("{:.1},{:.1}", i as f64 * step, y)
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let unit = if per_point == 1 {
        "a minute"
    } else {
        "per 15 minutes"
    };
    html! {
        figure.plot {
            figcaption { (title) " (at most " (top) " " (unit) ")" }
            svg xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
                viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(title) {
                rect x="0" y="0" width=(WIDTH) height=(HEIGHT) fill="#ffffff" stroke="#e2e5ea" {}
                @for (line, values) in lines.iter().zip(&buckets) {
                    polyline fill="none" stroke=(line.colour) stroke-width="1.5"
                        points=(polyline(values)) {}
                }
            }
            p.legend {
                @for (line, values) in lines.iter().zip(&buckets) {
                    span.key { svg width="10" height="10" { rect width="10" height="10" fill=(line.colour) {} } }
                    " " (line.label) " " (values.iter().sum::<u64>()) "  "
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plot_draws_each_line_scaled_to_the_largest_count_with_its_total() {
        let h = History::default();
        let series = |total| vec![(history::sink("crm", "delivered"), total)];
        for total in [0, 10, 30, 30] {
            h.sample(series(total));
        }
        let page = sink(&h, "crm").into_string();
        assert_eq!(
            page.matches("<svg xmlns").count(),
            2,
            "the hour and the day"
        );
        assert_eq!(page.matches("<polyline").count(), 6);
        assert!(page.contains("at most 20 a minute"), "{page}");
        assert!(page.contains("delivered 30"), "{page}");
        // The newest minute is on the right: 0 delivered, at the bottom.
        assert!(page.contains("360.0,78.0\""), "{page}");
    }
}
