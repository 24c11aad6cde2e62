// Time-series charts of the console, drawn by uPlot (the global `uPlot`
// from /console/vendor/uplot.js).
//
// Model: a chart shows one or more metrics against time. Each metric has
// its own y scale (units differ: °C next to km/h), the first two their own
// axis; a metric may carry a min–max band (rollup buckets on long ranges).
// The x axis is milliseconds in the operator's zone. Dragging across the
// plot zooms in on that span (uPlot's own selection), double-click or
// `reset()` zooms back out; `pan(±fraction)` and the arrow keys move the
// window. Colours come from the stylesheet's variables, so a chart follows
// the light or dark theme it is drawn in.

"use strict";

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/// The palette of the current theme.
export function themeColors() {
  return {
    fg: cssVar("--fg") || "#1d2430",
    muted: cssVar("--muted") || "#6b7585",
    grid: cssVar("--chart-grid") || "#e6e9ee",
    series: ["--s1", "--s2", "--s3", "--s4", "--s5", "--s6"].map((v) => cssVar(v) || "#1f6feb"),
  };
}

/// `tables`: one `[xs, ys]` (or `[xs, ys, mins, maxs]`) per metric, xs
/// ascending. Returns uPlot's aligned form: one x array, then per metric
/// its y (and min, max) arrays, with `null` where a metric has no point.
export function align(tables) {
  const set = new Set();
  for (const t of tables) for (const x of t[0]) set.add(x);
  const xs = [...set].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const out = [xs];
  for (const t of tables) {
    for (let col = 1; col < t.length; col++) {
      const arr = new Array(xs.length).fill(null);
      t[0].forEach((x, i) => { arr[index.get(x)] = t[col][i]; });
      out.push(arr);
    }
  }
  return out;
}

/// Tick labels with as many decimals as the step between ticks needs
/// (uPlot's default keeps three, so 48.3508 and 48.3512 both read 48.351).
function tickValues(u, splits, axisIdx, space, incr) {
  let d = 0;
  while (d < 12 && incr > 0 && Math.abs(Math.round(incr * 10 ** d) - incr * 10 ** d) > 1e-6) d += 1;
  return splits.map((v) => (Math.abs(v) >= 1e6 ? v.toExponential(2) : v.toFixed(d)));
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a >= 1e6 || (a > 0 && a < 1e-3)) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}

/// Draw a chart into `box`.
///
/// `metrics`: `[{ name, band, zero, marks, scaleOf, color }]` in the order
/// of `data` (after x: the metric's values, then its min and max when
/// `band`; `zero`: the y scale starts at 0; `marks`: points only, on the
/// scale of the metric `scaleOf`, e.g. where a rule fired; `color`: a CSS
/// variable). `opts.onZoom(min,
/// max, zoomed)` is told when the visible x span changes; `opts.onReset()`
/// replaces the default zoom-out (double-click, `0`, `reset()`);
/// `opts.span`: the x span the chart stands for, if not the data's.
export function timeChart(box, metrics, data, opts = {}) {
  const colors = themeColors();
  const height = opts.height || 260;
  const series = [{}];
  const axes = [{
    stroke: colors.muted,
    grid: { stroke: colors.grid, width: 1 },
    ticks: { stroke: colors.grid },
  }];
  const bands = [];
  const scales = { x: { time: true } };
  metrics.forEach((m, i) => {
    const c = m.color ? cssVar(m.color) || colors.series[i % colors.series.length] : colors.series[i % colors.series.length];
    // Marks (points only) sit on the scale of the metric they annotate.
    const scale = "y:" + (m.scaleOf || m.name);
    const at = series.length;
    if (m.marks) {
      series.push({ label: m.name, scale, stroke: c, fill: c, width: 0, paths: () => null, points: { show: true, size: 10, width: 2, stroke: c, fill: c } });
      return;
    }
    // Rates and counts start at zero, so a flat 33 ± 0.5 reads as flat.
    if (m.zero) scales[scale] = { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] };
    // Points show by themselves where the data is sparse (uPlot's default).
    series.push({ label: m.name, scale, stroke: c, width: 1.5, spanGaps: true });
    if (m.band) {
      series.push({ label: m.name + " min", scale, stroke: c + "66", width: 0.5, spanGaps: true, points: { show: false } });
      series.push({ label: m.name + " max", scale, stroke: c + "66", width: 0.5, spanGaps: true, points: { show: false } });
      bands.push({ series: [at + 2, at + 1], fill: c + "26" });
    }
    if (i < 2) {
      axes.push({
        // Wide enough for the longest label (about 7 px a character).
        scale, side: i === 0 ? 3 : 1, stroke: c,
        size: (u, values) => (values && values.length ? Math.max(...values.map((v) => String(v).length)) * 7 + 18 : 50),
        grid: { show: i === 0, stroke: colors.grid, width: 1 },
        ticks: { stroke: colors.grid },
        values: tickValues,
      });
    }
  });
  let full = null; // the x span of the data, for "zoomed?"
  const span = (d) => (d[0].length ? [d[0][0], d[0][d[0].length - 1]] : null);
  full = opts.span || span(data);
  const plot = new uPlot({
    width: Math.max(200, box.clientWidth - 16),
    height,
    ms: 1,
    series,
    axes,
    bands,
    cursor: { drag: { x: true, y: false, setScale: true } },
    legend: { live: true },
    scales,
    hooks: {
      setScale: [(u, key) => {
        if (key !== "x" || !opts.onZoom) return;
        const { min, max } = u.scales.x;
        const zoomed = !!full && (min > full[0] + 1 || max < full[1] - 1);
        box.dataset.zoomed = zoomed ? "true" : "false";
        opts.onZoom(min, max, zoomed);
      }],
    },
  }, data, box);
  if (opts.span) plot.setScale("x", { min: opts.span[0], max: opts.span[1] });
  box.dataset.zoomed = "false";
  const ro = new ResizeObserver(() => plot.setSize({ width: Math.max(200, box.clientWidth - 16), height }));
  ro.observe(box);
  // Keyboard: arrows pan, +/- zoom, 0 resets (the box is focusable).
  box.tabIndex = 0;
  const api = {
    plot,
    /// Replace the data; keep the operator's zoom unless `rescale`.
    /// `whole`: the x span the chart stands for (the range asked for, which
    /// the data may not fill), else the data's extent.
    setData(d, rescale = true, whole = null) {
      full = whole || span(d);
      plot.setData(d, rescale);
      if (rescale && whole) plot.setScale("x", { min: whole[0], max: whole[1] });
    },
    pan(frac) {
      const { min, max } = plot.scales.x;
      const d = (max - min) * frac;
      plot.setScale("x", { min: min + d, max: max + d });
    },
    zoom(factor) {
      const { min, max } = plot.scales.x;
      const mid = (min + max) / 2, half = ((max - min) / 2) * factor;
      plot.setScale("x", { min: mid - half, max: mid + half });
    },
    // Whole range: the caller's (`opts.onReset`, e.g. read the range
    // again after a zoom read a window finer), else the data's extent.
    reset() {
      if (opts.onReset) opts.onReset();
      else if (full) plot.setScale("x", { min: full[0], max: full[1] });
    },
    zoomed: () => box.dataset.zoomed === "true",
    destroy() { ro.disconnect(); plot.destroy(); },
  };
  if (opts.onReset) plot.over.addEventListener("dblclick", () => opts.onReset());
  box.addEventListener("keydown", (ev) => {
    const act = { ArrowLeft: () => api.pan(-0.25), ArrowRight: () => api.pan(0.25), "+": () => api.zoom(0.5), "=": () => api.zoom(0.5), "-": () => api.zoom(2), "0": () => api.reset() }[ev.key];
    if (act) { ev.preventDefault(); act(); }
  });
  return api;
}

/// A chart of bars (counts per bucket), e.g. alarms per hour.
export function barChart(box, labels, data, opts = {}) {
  const colors = themeColors();
  const height = opts.height || 200;
  const bars = uPlot.paths.bars({ size: [0.8, 40] });
  const plot = new uPlot({
    width: Math.max(200, box.clientWidth - 16),
    height,
    ms: 1,
    series: [{}, ...labels.map((l, i) => ({
      label: l, stroke: colors.series[i % colors.series.length],
      fill: colors.series[i % colors.series.length] + "99", paths: bars, points: { show: false },
    }))],
    axes: [
      { stroke: colors.muted, grid: { stroke: colors.grid, width: 1 }, ticks: { stroke: colors.grid } },
      { stroke: colors.muted, grid: { stroke: colors.grid, width: 1 }, ticks: { stroke: colors.grid }, values: (u, v) => v.map(fmtTick) },
    ],
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
    cursor: { drag: { x: true, y: false, setScale: true } },
  }, data, box);
  const ro = new ResizeObserver(() => plot.setSize({ width: Math.max(200, box.clientWidth - 16), height }));
  ro.observe(box);
  return { plot, setData: (d) => plot.setData(d), destroy() { ro.disconnect(); plot.destroy(); } };
}
