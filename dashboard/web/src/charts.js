// Charts: uPlot (from npm, served by the app) in resizable cards, select-to-zoom, live appends
// coalesced to one redraw per animation frame, and hooks for tests and benchmarks:
//   window.tensordbCharts[id] = {points(), steps(), values(label), redraw(), element}
//   every chart element carries data-points (and data-last-step) after each draw;
//   window.tensordbLatency, when the page's hash has latency=1: [step, wall_time_ms, drawn_at_ms]
//   for each live point, drawn_at being Date.now() in uPlot's draw hook.
import uPlot from "./vendor/uPlot.esm.js";

export const registry = (window.tensordbCharts = window.tensordbCharts || {});
if (!("tensordbLatency" in window)) window.tensordbLatency = null;

const PHASE_COLOURS = { train: "#2563eb", validation: "#ea580c", test: "#16a34a" };

export function colour(index) {
  return `hsl(${(index * 137.508) % 360}, 70%, 42%)`;
}

export function phaseColour(phase, index) {
  return PHASE_COLOURS[phase] || colour(index);
}

/** index of the first element >= x in a sorted array */
export function bisect(xs, x) {
  let lo = 0;
  let hi = xs.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (xs[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** TensorBoard's smoothing: a debiased exponential moving average that skips gaps. */
export function smooth(ys, weight) {
  if (!weight) return ys;
  const out = new Array(ys.length);
  let average = 0;
  let n = 0;
  for (let i = 0; i < ys.length; i++) {
    const y = ys[i];
    if (y === null || y === undefined || !Number.isFinite(y)) {
      out[i] = null;
      continue;
    }
    average = average * weight + (1 - weight) * y;
    n += 1;
    out[i] = average / (1 - weight ** n);
  }
  return out;
}

/** null for values a log scale cannot show */
export function positive(ys) {
  return ys.map((y) => (y !== null && y > 0 ? y : null));
}

/**
 * The points of one metric of one run: a sorted step axis and one value column per phase.
 * Points are keyed by step: adding a step that is already there changes nothing (the history
 * from MongoDB and the live stream overlap at the seam), so there are never duplicates.
 */
export class MetricCurves {
  constructor(phases = []) {
    this.x = [];
    this.y = {};
    for (const phase of phases) this.y[phase] = [];
  }

  static from(aligned) {
    const curves = new MetricCurves(Object.keys(aligned.y));
    curves.x = aligned.x.slice();
    for (const [phase, values] of Object.entries(aligned.y)) curves.y[phase] = values.slice();
    return curves;
  }

  phases() {
    return Object.keys(this.y);
  }

  /** returns true when the curve changed */
  add(phase, step, value) {
    if (!(phase in this.y)) this.y[phase] = new Array(this.x.length).fill(null);
    const xs = this.x;
    const n = xs.length;
    if (n === 0 || step > xs[n - 1]) {
      xs.push(step);
      for (const [p, values] of Object.entries(this.y)) values.push(p === phase ? value : null);
      return true;
    }
    const i = bisect(xs, step);
    if (xs[i] === step) {
      if (this.y[phase][i] !== null || value === null) return false;  // the first write wins
      this.y[phase][i] = value;
      return true;
    }
    xs.splice(i, 0, step);
    for (const [p, values] of Object.entries(this.y)) values.splice(i, 0, p === phase ? value : null);
    return true;
  }

  data() {
    return [this.x, ...this.phases().map((p) => this.y[p])];
  }
}

/**
 * A uPlot chart in `container`. series: [{label, stroke}] (stroke: a colour, or a function
 * (u, seriesIndex) => colour, asked again at each draw: see restyle()). Options: time (x is Unix
 * seconds), log (y on a log scale), xLabel, yLabel, height, onZoom(lo, hi) after a drag-selection,
 * onReset() after a double click, bars, cursorPoints (false: no hover dot per series, for charts of
 * hundreds of series), legend (default: up to 24 series), integerX (x ticks on whole numbers only,
 * e.g. epochs), decorate(u) (draws over the plot after each draw).
 */
export class Chart {
  constructor(container, id, series, options = {}) {
    this.container = container;
    this.id = id;
    this.options = options;
    this.series = series;
    this.data = [[], ...series.map(() => [])];
    this.frame = 0;
    this.latency = [];
    this.plot = this.make();
    this.resize = new ResizeObserver(() => this.fit());
    this.resize.observe(container);
    registry[id] = {
      element: container,
      points: () => this.data[0].length,
      steps: () => Array.from(this.data[0]),
      values: (label) => {
        const index = this.series.findIndex((s) => s.label === label);
        return index < 0 ? null : Array.from(this.data[index + 1]);
      },
      /** milliseconds to redraw everything (what a refresh with new data costs); for benchmarks */
      redraw: async () => {
        const start = performance.now();
        this.plot.setData(this.data.map((column) => column.slice()));
        await new Promise((resolve) => setTimeout(resolve));
        return performance.now() - start;
      },
    };
  }

  make() {
    const {
      time = false, log = false, xLabel, yLabel, height = 260, bars = false, cursorPoints = true, legend = this.series.length <= 24,
      integerX = false, decorate,
    } = this.options;
    const opts = {
      width: Math.max(this.container.clientWidth, 200),
      height,
      scales: { x: { time }, y: log ? { distr: 3 } : {} },
      series: [
        { label: xLabel || (time ? "time" : "step") },
        ...this.series.map((s) => ({
          label: s.label,
          stroke: s.stroke,
          fill: bars ? s.stroke : undefined,
          width: this.series.length > 8 ? 1 : 1.5,  // thin lines rasterise ~5x faster: many runs stay quick to redraw
          spanGaps: true,
          points: { show: false },
          paths: bars ? uPlot.paths.bars({ size: [0.9, 40] }) : undefined,
        })),
      ],
      axes: [integerX ? { label: xLabel, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] } : { label: xLabel }, { label: yLabel, size: 60 }],
      legend: { show: legend },
      cursor: { drag: { x: true, y: false, setScale: false }, points: { show: cursorPoints } },
      hooks: {
        setSelect: [(u) => this.selected(u)],
        draw: [(u) => { if (decorate) decorate(u); this.drawn(); }],
      },
    };
    const plot = new uPlot(opts, this.data, this.container);
    plot.over.addEventListener("dblclick", () => this.options.onReset && this.options.onReset());
    return plot;
  }

  selected(u) {
    if (u.select.width < 3) return;
    const lo = u.posToVal(u.select.left, "x");
    const hi = u.posToVal(u.select.left + u.select.width, "x");
    u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
    if (this.options.onZoom) this.options.onZoom(lo, hi);
  }

  drawn() {
    const points = this.data[0].length;
    this.container.dataset.points = String(points);
    this.container.dataset.lastStep = points ? String(this.data[0][points - 1]) : "";
    if (this.latency.length && window.tensordbLatency) {
      const now = Date.now();
      for (const [step, wall] of this.latency) window.tensordbLatency.push([step, wall * 1000, now]);
    }
    this.latency = [];
  }

  fit() {
    const width = Math.max(this.container.clientWidth, 200);
    if (width !== this.plot.width) this.plot.setSize({ width, height: this.plot.height });
  }

  /** replace the data ([x, y1, y2...]); drawn at the next animation frame */
  set(data) {
    this.data = data;
    if (!this.frame) {
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.plot.setData(this.data);
      });
    }
  }

  /** redraw with the series' colours asked again (stroke functions), the data unchanged */
  restyle() {
    if (!this.frame) this.plot.redraw(false, false);
  }

  /** note live points (step, wall time) to time when they are drawn (benchmarks) */
  noteLive(step, wall) {
    if (window.tensordbLatency) this.latency.push([step, wall]);
  }

  destroy() {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.resize.disconnect();
    this.plot.destroy();
    if (registry[this.id] && registry[this.id].element === this.container) delete registry[this.id];
  }
}
