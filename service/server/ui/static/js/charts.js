// Line charts on uPlot (vendored under static/vendor/uplot). A chart owns its data arrays;
// callers add points and the chart redraws at most once per frame. The number of points
// plotted is kept in the container's data-points attribute (the browser tests count it).

import uPlot from "../vendor/uplot/uPlot.esm.js";

const COLORS = ["#2f6fdf", "#e0663c", "#2a9d5c", "#9b4dca", "#c9a227", "#1aa3b8", "#d6457a"];

function fmtTick(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-2 || a >= 1e5) ? v.toExponential(1) : String(+v.toPrecision(4));
}

export class LineChart {
  /** series: labels of the y series; x is the training step. */
  constructor(container, title, series, { xLabel = "step" } = {}) {
    this.container = container;
    this.xs = [];
    this.ys = series.map(() => []);
    this.index = new Map(); // x -> row
    this.pending = false;
    container.classList.add("chart");
    container.dataset.points = "0";
    const opts = {
      title,
      width: Math.max(320, container.clientWidth || 480),
      height: 220,
      scales: { x: { time: false } },
      axes: [{ label: xLabel }, { values: (u, vals) => vals.map(fmtTick), size: 60 }],
      series: [
        { label: xLabel },
        ...series.map((label, i) => ({
          label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
          points: { show: true, size: 4 },
        })),
      ],
    };
    this.plot = new uPlot(opts, [this.xs, ...this.ys], container);
    this.resize = () => this.plot.setSize({ width: Math.max(320, container.clientWidth), height: 220 });
    window.addEventListener("resize", this.resize);
  }

  /** Set series i at x (adds the x row if new; rows stay sorted by x). */
  set(x, i, y) {
    if (y === null || y === undefined || !Number.isFinite(y)) return;
    let row = this.index.get(x);
    if (row === undefined) {
      let at = this.xs.length;
      while (at > 0 && this.xs[at - 1] > x) at -= 1;
      this.xs.splice(at, 0, x);
      for (const ys of this.ys) ys.splice(at, 0, null);
      if (at === this.xs.length - 1) this.index.set(x, at);
      else this.index = new Map(this.xs.map((v, r) => [v, r]));
      row = at;
    }
    this.ys[i][row] = y;
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.plot.setData([this.xs, ...this.ys]);
      const plotted = this.plot.data.slice(1)
        .reduce((n, ys) => n + ys.filter((v) => v !== null && v !== undefined).length, 0);
      this.container.dataset.points = String(plotted);
    });
  }

  destroy() {
    window.removeEventListener("resize", this.resize);
    this.plot.destroy();
  }
}
