// A small SVG line chart (no library): several named series over a shared x axis.
const COLORS = ["#4ea1ff", "#ffb000", "#3fbf7f", "#ff6b6b", "#c38bff", "#5fd3d3", "#e0e0e0"];
const NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function ticks(lo, hi, n = 5) {
  if (hi === lo) { hi = lo + 1; }
  const step = 10 ** Math.floor(Math.log10((hi - lo) / n));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => (hi - lo) / s <= n) || step * 10;
  const out = [];
  for (let v = Math.ceil(lo / nice) * nice; v <= hi + 1e-12; v += nice) out.push(Number(v.toPrecision(6)));
  return out;
}

/** series: [{name, points: [[x, y], ...]}]; returns {svg, legend} elements. */
export function linePlot(series, { width = 820, height = 300, xLabel = "step", log = false } = {}) {
  const pad = { l: 60, r: 16, t: 12, b: 40 };
  const tf = (y) => (log ? Math.log10(Math.max(y, 1e-12)) : y);
  const pts = series.flatMap((s) => s.points).filter(([, y]) => Number.isFinite(y));
  const svg = el("svg", { class: "plot", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  if (!pts.length) {
    svg.append(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no data yet"));
    return { svg, legend: document.createElement("div") };
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => tf(p[1]))), Math.max(...pts.map((p) => tf(p[1])))];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const Y = (y) => height - pad.b - ((tf(y) - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  const Yt = (t) => height - pad.b - ((t - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  for (const t of ticks(y0, y1)) {
    svg.append(el("line", { class: "gridline", x1: pad.l, x2: width - pad.r, y1: Yt(t), y2: Yt(t) }));
    svg.append(el("text", { x: pad.l - 6, y: Yt(t) + 4, "text-anchor": "end" }, log ? Number((10 ** t).toPrecision(2)).toString() : String(t)));
  }
  for (const t of ticks(x0, x1, 8)) {
    svg.append(el("text", { x: X(t), y: height - pad.b + 16, "text-anchor": "middle" }, String(t)));
  }
  svg.append(el("line", { class: "axis", x1: pad.l, x2: width - pad.r, y1: height - pad.b, y2: height - pad.b }));
  svg.append(el("line", { class: "axis", x1: pad.l, x2: pad.l, y1: pad.t, y2: height - pad.b }));
  svg.append(el("text", { x: (width + pad.l) / 2, y: height - 6, "text-anchor": "middle" }, xLabel));
  const legend = document.createElement("div");
  legend.className = "legend";
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const good = s.points.filter(([, y]) => Number.isFinite(y));
    if (!good.length) return;
    svg.append(el("polyline", { fill: "none", stroke: color, "stroke-width": 2,
      points: good.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ") }));
    if (good.length === 1) svg.append(el("circle", { cx: X(good[0][0]), cy: Y(good[0][1]), r: 3, fill: color }));
    const item = document.createElement("span");
    const sw = document.createElement("i");
    sw.style.background = color;
    item.append(sw, `${s.name} (last ${good[good.length - 1][1].toPrecision(4)})`);
    legend.append(item);
  });
  return { svg, legend };
}
