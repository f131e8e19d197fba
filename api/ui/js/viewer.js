// Slice viewer: every series of a job on one RAS+ grid, shown side by side, scrolled and windowed together.
// Radiological convention: the patient's right is on the viewer's left (axial, coronal); anterior left (sagittal).
import { h } from "./dom.js";

const PLANES = {  // fixed axis, image axes (column, row) with their flips, orientation letters (left, right)
  axial: { fixed: 2, col: 0, row: 1, letters: ["R", "L"] },
  coronal: { fixed: 1, col: 0, row: 2, letters: ["R", "L"] },
  sagittal: { fixed: 0, col: 1, row: 2, letters: ["A", "P"] },
};

function heatLut() {  // black -> purple -> orange -> yellow (magma-like), 256 entries
  const stops = [[0, 0, 0, 4], [0.3, 90, 22, 110], [0.6, 220, 70, 80], [0.85, 252, 170, 70], [1, 252, 253, 191]];
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    let k = 0;
    while (k < stops.length - 2 && t > stops[k + 1][0]) k++;
    const [t0, ...a] = stops[k], [t1, ...b] = stops[k + 1];
    const f = (t - t0) / (t1 - t0);
    for (let c = 0; c < 3; c++) lut[3 * i + c] = a[c] + f * (b[c] - a[c]);
  }
  return lut;
}
const HEAT = heatLut();

/** synthesized - reference as a volume (same grid), shown on a blue-white-red scale. */
export function difference(a, b) {
  const data = new Float32Array(a.data.length);
  for (let i = 0; i < data.length; i++) data[i] = a.data[i] - b.data[i];
  return { dims: a.dims, spacing: a.spacing, data, min: -1, max: 1, low: -0.5, high: 0.5 };
}

export class Viewer {
  /** panels: [{id, title, volume, kind: "gray" | "heat" | "diff", synthetic}] */
  constructor(panels) {
    this.panels = panels;
    const dims = panels[0].volume.dims;
    this.dims = dims;
    this.cursor = dims.map((d) => Math.floor(d / 2));
    this.plane = "axial";
    this.level = 50;  // percent of each series' own display range
    this.width = 100;
    this.element = this.build();
    this.render();
  }

  build() {
    this.slider = h("input", { type: "range", id: "slice", min: 0, value: 0, "aria-label": "Slice",
      oninput: (e) => this.setSlice(Number(e.target.value)) });
    this.sliceLabel = h("span", { class: "mono", id: "slice-label", "aria-live": "polite" });
    this.levelInput = h("input", { type: "range", min: 0, max: 100, value: this.level, "aria-label": "Level",
      oninput: (e) => { this.level = Number(e.target.value); this.render(); } });
    this.widthInput = h("input", { type: "range", min: 5, max: 200, value: this.width, "aria-label": "Window",
      oninput: (e) => { this.width = Number(e.target.value); this.render(); } });
    this.planeButtons = Object.keys(PLANES).map((p) => h("button", { type: "button", "data-plane": p,
      "aria-pressed": String(p === this.plane), onclick: () => this.setPlane(p) }, p[0].toUpperCase() + p.slice(1)));
    const controls = h("div", { class: "viewer-controls" },
      h("span", { class: "planes", role: "group", "aria-label": "Plane" }, this.planeButtons),
      h("label", {}, "Slice ", this.slider), this.sliceLabel,
      h("label", {}, "Window ", this.widthInput), h("label", {}, "Level ", this.levelInput),
      h("button", { type: "button", onclick: () => this.resetWindow() }, "Reset W/L"),
      h("span", { class: "muted" }, "wheel / arrow keys / PgUp PgDn: slices · drag: window/level · click: cross-reference · A C S: plane"));
    this.canvases = this.panels.map((p) => {
      const canvas = h("canvas", { "data-series": p.id, "aria-label": `${p.title} slice` });
      canvas.addEventListener("wheel", (e) => { e.preventDefault(); this.step(e.deltaY > 0 ? 1 : -1); }, { passive: false });
      this.attachDrag(canvas);
      return canvas;
    });
    this.letters = this.panels.map(() => [h("span", { class: "orient l" }), h("span", { class: "orient r" })]);
    const panels = h("div", { class: "panels" }, this.panels.map((p, i) => h("figure",
      { class: `panel ${p.synthetic ? "synthetic" : ""}`, style: "margin:0" },
      h("h3", {}, p.title), h("div", { style: "position:relative" }, this.canvases[i], ...this.letters[i]))));
    const root = h("section", { class: "viewer", tabindex: 0, "aria-label": "Slice viewer (arrow keys scroll slices)",
      onkeydown: (e) => this.key(e) }, controls, panels);
    return root;
  }

  attachDrag(canvas) {
    let start = null;
    canvas.addEventListener("pointerdown", (e) => {
      start = { x: e.clientX, y: e.clientY, level: this.level, width: this.width, moved: false };
      canvas.setPointerCapture(e.pointerId);
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!start) return;
      const dx = e.clientX - start.x, dy = e.clientY - start.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) start.moved = true;
      if (!start.moved) return;
      this.width = Math.min(200, Math.max(5, start.width + dx / 3));
      this.level = Math.min(100, Math.max(0, start.level - dy / 3));
      this.widthInput.value = this.width; this.levelInput.value = this.level;
      this.render();
    });
    canvas.addEventListener("pointerup", (e) => {
      if (start && !start.moved) this.pick(canvas, e);
      start = null;
    });
  }

  pick(canvas, e) {  // click: move the other two planes' cursor to this point
    const rect = canvas.getBoundingClientRect();
    const c = Math.floor(((e.clientX - rect.left) / rect.width) * canvas.width);
    const r = Math.floor(((e.clientY - rect.top) / rect.height) * canvas.height);
    const pl = PLANES[this.plane];
    this.cursor[pl.col] = this.dims[pl.col] - 1 - c;
    this.cursor[pl.row] = this.dims[pl.row] - 1 - r;
    this.render();
  }

  key(e) {
    const steps = { ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10 };
    const planes = { a: "axial", c: "coronal", s: "sagittal" };
    if (e.key in steps) this.step(steps[e.key]);
    else if (e.key === "Home") this.setSlice(0);
    else if (e.key === "End") this.setSlice(this.dims[PLANES[this.plane].fixed] - 1);
    else if (e.key.toLowerCase() in planes && !e.ctrlKey && !e.metaKey) this.setPlane(planes[e.key.toLowerCase()]);
    else return;
    e.preventDefault();
  }

  resetWindow() {
    this.level = 50; this.width = 100;
    this.levelInput.value = this.level; this.widthInput.value = this.width;
    this.render();
  }

  setPlane(plane) {
    this.plane = plane;
    this.planeButtons.forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.plane === plane)));
    this.render();
  }

  step(delta) { this.setSlice(this.cursor[PLANES[this.plane].fixed] + delta); }

  setSlice(index) {
    const axis = PLANES[this.plane].fixed;
    this.cursor[axis] = Math.max(0, Math.min(this.dims[axis] - 1, index));
    this.render();
  }

  get slice() { return this.cursor[PLANES[this.plane].fixed]; }

  render() {
    const pl = PLANES[this.plane];
    const [nx, ny] = this.dims;
    const w = this.dims[pl.col], hgt = this.dims[pl.row];
    const n = this.dims[pl.fixed];
    this.slider.max = n - 1;
    this.slider.value = this.slice;
    this.sliceLabel.textContent = `${this.plane} ${this.slice + 1} / ${n}`;
    const strides = [1, nx, nx * ny];
    this.panels.forEach((p, i) => {
      const vol = p.volume;
      const canvas = this.canvases[i];
      if (canvas.width !== w || canvas.height !== hgt) { canvas.width = w; canvas.height = hgt; }
      canvas.style.aspectRatio = `${w * vol.spacing[pl.col]} / ${hgt * vol.spacing[pl.row]}`;
      const [left, right] = this.letters[i];
      left.textContent = pl.letters[0]; right.textContent = pl.letters[1];
      const ctx = canvas.getContext("2d");
      const img = ctx.createImageData(w, hgt);
      const px = img.data;
      const range = vol.high - vol.low || 1;
      let lo, hi;
      if (p.kind === "diff") { hi = 0.5 * range * (this.width / 100); lo = -hi; } else {
        const center = vol.low + range * (this.level / 100);
        const half = (range * this.width) / 200;
        lo = center - half; hi = center + half;
      }
      const scale = 255 / (hi - lo || 1);
      const base = this.cursor[pl.fixed] * strides[pl.fixed];
      const sc = strides[pl.col], sr = strides[pl.row];
      let o = 0;
      for (let r = 0; r < hgt; r++) {
        const rowBase = base + (hgt - 1 - r) * sr;
        for (let c = 0; c < w; c++, o += 4) {
          const v = vol.data[rowBase + (w - 1 - c) * sc];
          let g = (v - lo) * scale;
          g = g < 0 ? 0 : g > 255 ? 255 : g;
          if (p.kind === "heat") {
            const k = (g | 0) * 3;
            px[o] = HEAT[k]; px[o + 1] = HEAT[k + 1]; px[o + 2] = HEAT[k + 2];
          } else if (p.kind === "diff") {  // blue (synthesis too dark) - black - red (too bright)
            const d = g - 127.5;
            px[o] = d > 0 ? 2 * d : 0; px[o + 1] = 0; px[o + 2] = d < 0 ? -2 * d : 0;
          } else {
            px[o] = px[o + 1] = px[o + 2] = g;
          }
          px[o + 3] = 255;
        }
      }
      ctx.putImageData(img, 0, 0);
    });
  }
}
