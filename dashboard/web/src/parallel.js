// Parallel coordinates on one <canvas>: an axis per hyper-parameter (log scale for loguniform,
// categories for choice) and a last axis for the objective; a line per configuration. Dragging
// along an axis brushes a range of it (a click on the axis clears it); lines outside any brush turn
// grey and `onBrush(selected)` gets the keys of the lines inside every brush. One canvas, redrawn
// at most once per animation frame, so a thousand lines cost a few milliseconds, not a thousand
// DOM nodes. For tests: the canvas's container carries data-lines and data-selected, and
// window.tensordbParallel[id] = {axes(): [{name, x, top, bottom}] in CSS pixels of the canvas, selected()}.

export const parallelRegistry = (window.tensordbParallel = window.tensordbParallel || {});

const MARGIN = { top: 34, right: 70, bottom: 26, left: 60 };
const GREY = "rgba(156, 163, 175, 0.28)";
// viridis, from worst (0) to best (1)
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

/** the colour of a value at t in [0, 1] on the ramp (t = 1 is the best) */
export function rampColour(t, alpha = 0.85) {
  const x = Math.min(Math.max(Number.isFinite(t) ? t : 0, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2);
  const f = x - i;
  const [r, g, b] = RAMP[i].map((c, k) => Math.round(c + f * (RAMP[i + 1][k] - c)));
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}

/** a value as the text a category axis and the table show */
export function valueText(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** round, readable tick labels */
function tickText(value) {
  if (!Number.isFinite(value)) return "";
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(1);
  return String(Number(value.toPrecision(3)));
}

/**
 * An axis's scale: `unit(value)` in [0, 1] (bottom to top) or null when the value cannot be placed,
 * and `ticks` [{u, label}]. axis: {kind: choice|int|uniform|loguniform|objective, low, high, values}.
 */
export function axisScale(axis) {
  if (axis.kind === "choice") {
    const labels = axis.values.map(valueText);
    const n = labels.length;
    const at = (i) => (n === 1 ? 0.5 : i / (n - 1));
    const index = new Map(labels.map((label, i) => [label, i]));
    return {
      unit: (value) => (value === null || value === undefined || !index.has(valueText(value)) ? null : at(index.get(valueText(value)))),
      ticks: labels.map((label, i) => ({ u: at(i), label })),
    };
  }
  const log = axis.kind === "loguniform";
  let low = axis.low;
  let high = axis.high;
  if (!(low < high)) {  // one value only: centre it
    const pad = log ? low : Math.abs(low) || 1;
    low -= pad / 2;
    high += pad / 2;
    if (log && low <= 0) low = high / 4;
  }
  const f = log ? Math.log10 : (v) => v;
  const lo = f(low);
  const span = f(high) - lo;
  const unit = (value) => {
    if (typeof value !== "number" || !Number.isFinite(value) || (log && value <= 0)) return null;
    return (f(value) - lo) / span;
  };
  const ticks = [];
  if (log) {
    for (let p = Math.ceil(Math.log10(low)); p <= Math.floor(Math.log10(high)); p++) ticks.push(10 ** p);
    if (ticks.length < 2) ticks.splice(0, ticks.length, low, high);
  } else {
    for (let i = 0; i <= 4; i++) ticks.push(low + (i * (high - low)) / 4);
  }
  return { unit, ticks: ticks.map((v) => ({ u: unit(v), label: tickText(v) })) };
}

/** the objective axis's domain from the values shown (null when there is none yet) */
export function objectiveAxis(name, values, direction) {
  const finite = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  const low = finite.length ? Math.min(...finite) : 0;
  const high = finite.length ? Math.max(...finite) : 1;
  return { name, kind: "objective", low, high, direction };
}

/** whether a line lies inside every brush (brushes: Map axis index -> [lo, hi] in unit space) */
export function insideBrushes(units, brushes) {
  for (const [axis, [lo, hi]] of brushes) {
    const u = units[axis];
    if (u === null || u === undefined || u < lo - 1e-9 || u > hi + 1e-9) return false;
  }
  return true;
}

export class ParallelCoordinates {
  /** container: an element to draw in; options: {id, height, onBrush(selectedKeys)} */
  constructor(container, { id = "parallel", height = 320, onBrush = () => {} } = {}) {
    this.container = container;
    this.id = id;
    this.height = height;
    this.onBrush = onBrush;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "parallel-canvas";
    container.append(this.canvas);
    this.axes = [];
    this.scales = [];
    this.lines = [];      // [{key, units: [u per axis], colour (t in [0, 1])}]
    this.brushes = new Map();
    this.selected = new Set();
    this.highlighted = null;
    this.drag = null;
    this.frame = 0;
    this.resize = new ResizeObserver(() => this.schedule());
    this.resize.observe(container);
    this.canvas.addEventListener("pointerdown", (event) => this.down(event));
    this.canvas.addEventListener("pointermove", (event) => this.move(event));
    this.canvas.addEventListener("pointerup", (event) => this.up(event));
    parallelRegistry[id] = {
      element: container,
      axes: () => this.axes.map((axis, i) => ({ name: axis.name, x: this.axisX(i), top: MARGIN.top, bottom: this.height - MARGIN.bottom })),
      selected: () => [...this.selected],
    };
  }

  /** axes: [{name, kind, low, high, values, direction?}]; lines: [{key, values: [one per axis]}] */
  set(axes, lines) {
    const shape = axes.map((a) => `${a.name}:${a.kind}`).join("|");
    if (shape !== this.shape) this.brushes.clear();  // brushes belong to the axes they were drawn on
    this.shape = shape;
    this.axes = axes;
    this.scales = axes.map(axisScale);
    const objective = axes.length - 1;
    const better = axes[objective]?.direction === "min" ? (u) => 1 - u : (u) => u;
    this.lines = lines.map((line) => {
      const units = line.values.map((value, i) => this.scales[i].unit(value));
      const u = units[objective];
      return { key: line.key, units, colour: u === null ? null : better(u) };
    });
    this.select();
  }

  highlight(key) {
    if (key === this.highlighted) return;
    this.highlighted = key;
    this.schedule();
  }

  select() {
    const selected = new Set();
    for (const line of this.lines) if (insideBrushes(line.units, this.brushes)) selected.add(line.key);
    const changed = selected.size !== this.selected.size || [...selected].some((key) => !this.selected.has(key));
    this.selected = selected;
    this.schedule();
    if (changed) this.onBrush(selected);
  }

  clearBrushes() {
    this.brushes.clear();
    this.select();
  }

  axisX(i) {
    const width = this.width();
    const n = this.axes.length;
    return n <= 1 ? MARGIN.left : MARGIN.left + (i * (width - MARGIN.left - MARGIN.right)) / (n - 1);
  }

  width() {
    return Math.max(this.container.clientWidth, 320);
  }

  y(u) {
    return MARGIN.top + (1 - u) * (this.height - MARGIN.top - MARGIN.bottom);
  }

  unitAt(y) {
    return Math.min(Math.max(1 - (y - MARGIN.top) / (this.height - MARGIN.top - MARGIN.bottom), 0), 1);
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return { x: event.clientX - box.left, y: event.clientY - box.top };
  }

  down(event) {
    const { x, y } = this.point(event);
    let nearest = -1;
    for (let i = 0; i < this.axes.length; i++) if (Math.abs(this.axisX(i) - x) <= 16) nearest = i;
    if (nearest < 0 || y < MARGIN.top - 8 || y > this.height - MARGIN.bottom + 8) return;
    this.canvas.setPointerCapture(event.pointerId);
    this.drag = { axis: nearest, from: this.unitAt(y), to: this.unitAt(y), moved: false, startY: y };
    event.preventDefault();
  }

  move(event) {
    if (!this.drag) {
      const { x } = this.point(event);
      this.canvas.style.cursor = this.axes.some((_, i) => Math.abs(this.axisX(i) - x) <= 16) ? "ns-resize" : "default";
      return;
    }
    const { y } = this.point(event);
    this.drag.to = this.unitAt(y);
    this.drag.moved = this.drag.moved || Math.abs(y - this.drag.startY) >= 3;
    if (this.drag.moved) {
      this.brushes.set(this.drag.axis, [Math.min(this.drag.from, this.drag.to), Math.max(this.drag.from, this.drag.to)]);
      this.select();
    }
  }

  up() {
    if (!this.drag) return;
    if (!this.drag.moved) this.brushes.delete(this.drag.axis);  // a click on an axis clears its brush
    this.drag = null;
    this.select();
  }

  schedule() {
    if (!this.frame) this.frame = requestAnimationFrame(() => { this.frame = 0; this.draw(); });
  }

  draw() {
    const width = this.width();
    const ratio = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(width * ratio) || this.canvas.height !== Math.round(this.height * ratio)) {
      this.canvas.width = Math.round(width * ratio);
      this.canvas.height = Math.round(this.height * ratio);
      this.canvas.style.width = `${width}px`;
      this.canvas.style.height = `${this.height}px`;
    }
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, this.height);
    const xs = this.axes.map((_, i) => this.axisX(i));
    const path = (line) => {
      ctx.beginPath();
      let open = false;
      line.units.forEach((u, i) => {
        if (u === null) { open = false; return; }
        const y = this.y(u);
        if (open) ctx.lineTo(xs[i], y);
        else ctx.moveTo(xs[i], y);
        open = true;
      });
      ctx.stroke();
    };
    ctx.lineWidth = 1;
    ctx.strokeStyle = GREY;
    let drawn = 0;
    for (const line of this.lines) if (!this.selected.has(line.key)) { path(line); drawn++; }
    const many = this.lines.length > 200;
    ctx.lineWidth = many ? 1 : 1.5;
    for (const line of this.lines) {
      if (!this.selected.has(line.key)) continue;
      ctx.strokeStyle = line.colour === null ? "rgba(107, 114, 128, 0.7)" : rampColour(line.colour, many ? 0.55 : 0.9);
      path(line);
      drawn++;
    }
    const hot = this.highlighted === null ? null : this.lines.find((line) => line.key === this.highlighted);
    if (hot) {
      ctx.lineWidth = 3;
      ctx.strokeStyle = "#111827";
      path(hot);
    }
    // axes, ticks, names, brushes
    ctx.font = "11px system-ui, sans-serif";
    this.axes.forEach((axis, i) => {
      const x = xs[i];
      const brush = this.brushes.get(i);  // under the axis and its labels
      if (brush) {
        ctx.fillStyle = "rgba(37, 99, 235, 0.18)";
        ctx.strokeStyle = "rgba(37, 99, 235, 0.9)";
        ctx.lineWidth = 1;
        const top = this.y(brush[1]);
        const bottom = this.y(brush[0]);
        ctx.fillRect(x - 8, top, 16, bottom - top);
        ctx.strokeRect(x - 8, top, 16, bottom - top);
      }
      ctx.strokeStyle = "#374151";
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(x, this.y(1));
      ctx.lineTo(x, this.y(0));
      ctx.stroke();
      ctx.fillStyle = "#374151";
      ctx.textAlign = "center";
      ctx.font = "600 12px system-ui, sans-serif";
      const name = axis.kind === "loguniform" ? `${axis.name} (log)` : axis.kind === "objective" ? `${axis.name} (${axis.direction})` : axis.name;
      const half = ctx.measureText(name).width / 2;  // centred on its axis, but never cut at the edges
      ctx.fillText(name, Math.min(Math.max(x, half + 2), width - half - 2), MARGIN.top - 16);
      ctx.font = "11px system-ui, sans-serif";
      ctx.textAlign = "right";
      ctx.lineWidth = 3;
      ctx.lineJoin = "round";
      ctx.strokeStyle = "rgba(255, 255, 255, 0.85)";  // a halo: labels stay readable over the lines
      for (const tick of this.scales[i].ticks) {
        if (tick.u === null) continue;
        const y = this.y(tick.u);
        const label = tick.label.length > 12 ? `${tick.label.slice(0, 11)}…` : tick.label;
        ctx.fillStyle = "#374151";
        ctx.fillRect(x - 3, y - 0.5, 3, 1);
        ctx.strokeText(label, x - 5, y + 4);
        ctx.fillText(label, x - 5, y + 4);
      }
    });
    this.container.dataset.lines = String(drawn);
    this.container.dataset.selected = String(this.selected.size);
  }

  destroy() {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.resize.disconnect();
    this.canvas.remove();
    if (parallelRegistry[this.id]?.element === this.container) delete parallelRegistry[this.id];
  }
}
