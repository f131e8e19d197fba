// Slice viewer on NiiVue (WebGL2; ../vendor/niivue.js, installed from npm by `make install`, docs/ui.md): one
// NiiVue instance per series, side by side, the crosshair (hence the slices) linked across them, zoom and pan per
// panel unless "Link zoom" is on, window/level per panel, overlays each with a toggle and an opacity (the
// uncertainty on the synthesized panel, with its colour bar; a raw study's brain-mask outline and registration edges).
// Radiological convention: the patient's right is on the viewer's left.
import { DRAG_MODE, NVImage, Niivue, SLICE_TYPE } from "../vendor/niivue.js";
import { h } from "./dom.js";

const BANNER = "SYNTHETIC - not for primary diagnosis";
const LAYOUTS = {  // layout -> NiiVue slice type and the RAS voxel axis the slice keys and slider step along
  axial: { type: SLICE_TYPE.AXIAL, axis: 2, key: "a" },
  coronal: { type: SLICE_TYPE.CORONAL, axis: 1, key: "c" },
  sagittal: { type: SLICE_TYPE.SAGITTAL, axis: 0, key: "s" },
  multiplanar: { type: SLICE_TYPE.MULTIPLANAR, axis: 2, key: "m" },
};
const DIFF_CMAP = {  // synthetic - reference: blue (synthesis too dark) - black (equal) - red (too bright)
  R: [0, 0, 0, 128, 255], G: [0, 0, 0, 0, 0], B: [255, 128, 0, 0, 0], A: [255, 255, 255, 255, 255],
  I: [0, 64, 128, 192, 255],
};
const OUTLINE_CMAP = { R: [0, 255], G: [0, 208], B: [0, 0], A: [0, 255], I: [0, 255] };  // 1: yellow
const EDGES_CMAP = { R: [0, 0], G: [0, 229], B: [0, 255], A: [0, 255], I: [0, 255] };  // 1: cyan
const OVERLAY_LOOK = {  // overlay kind -> colormap, window, opacity, colour bar
  uncertainty: { colormap: "hot", opacity: 0.6, colorbar: true },
  outline: { colormap: "msgldm_outline", opacity: 0.9, range: [0.5, 1], colorbar: false },
  edges: { colormap: "msgldm_edges", opacity: 0.6, range: [0.5, 1], colorbar: false },
};
const OPTIONS = {
  isRadiologicalConvention: true, backColor: [0, 0, 0, 1], crosshairColor: [0.2, 0.9, 0.3, 0.9], show3Dcrosshair: false,
  isColorbar: false, multiplanarShowRender: 0 /* never: 2D planes only */, logLevel: "error", loadingText: "",
  dragModePrimary: DRAG_MODE.crosshair, dragMode: DRAG_MODE.contrast, isOrientationTextVisible: true,
  mouseEventConfig: { leftButton: { primary: DRAG_MODE.crosshair }, rightButton: DRAG_MODE.contrast,
    centerButton: DRAG_MODE.pan },
};
const HELP = "click: crosshair (all panels) · wheel / arrow keys / PgUp PgDn: slices · right-drag: window/level · "
  + "middle-drag: pan · Ctrl+wheel: zoom · A C S M: layout";

/** The difference synthetic - reference as a new image on the synthesized one's grid (both on the job's grid). */
function difference(synth, ref) {
  const diff = synth.clone();
  const a = synth.img, b = ref.img, n = a.length;
  const sa = synth.hdr.scl_slope || 1, ia = synth.hdr.scl_inter || 0;
  const sb = ref.hdr.scl_slope || 1, ib = ref.hdr.scl_inter || 0;
  diff.img = new Float32Array(n);
  for (let i = 0; i < n; i++) diff.img[i] = (a[i] * sa + ia) - (b[i] * sb + ib);
  Object.assign(diff.hdr, { datatypeCode: 16, numBitsPerVoxel: 32, scl_slope: 1, scl_inter: 0 });
  diff.name = `${synth.name}-difference`;
  diff.colormap = "msgldm_diff";
  diff.cal_min = -0.5;
  diff.cal_max = 0.5;
  return diff;
}

export class Viewer {
  /** series: [{id, title, bytes (ArrayBuffer of a NIfTI), name, synthetic, differenceOf,
   *            overlays: [{id, title, kind (OVERLAY_LOOK), bytes, name}]}] */
  constructor(series) {
    this.series = series;
    this.layout = "axial";
    this.linkZoom = false;
    this.panels = [];  // {id, title, nv, canvas, figure, synthetic, range: [lo, hi] (the reset window), width, level,
    //                     overlays: [{id, index (in nv.volumes), opacity, colorbar}]}
    this.element = h("section", { class: "viewer", tabindex: 0, "aria-label": "Slice viewer (arrow keys scroll slices)" });
    this.element.addEventListener("keydown", (e) => this.key(e), { capture: true });  // before NiiVue's own keys
  }

  /** Builds the panels and loads every volume; call once this.element is in the document (NiiVue sizes to it). */
  async load(onProgress = () => {}) {
    const controls = this.buildControls();
    const grid = h("div", { class: "panels" });
    this.element.append(controls, grid);
    const specs = [];
    for (const s of this.series) {
      specs.push(s);
      if (s.differenceOf) {
        specs.push({ id: `${s.differenceOf}.difference`, title: `${s.differenceOf.toUpperCase()} synthetic − reference`,
          diffOf: [s.differenceOf, s.id] });
      }
    }
    // every panel in the page first: NiiVue resizes its canvas with its box, so adding panels one by one would
    // resize (and redraw) the earlier ones each time
    const panels = specs.map((s) => this.buildPanel(s));
    grid.append(...panels.map((p) => p.figure));
    const images = {};
    for (const [i, s] of specs.entries()) {
      onProgress(`Preparing ${s.title} (${i + 1}/${specs.length})`);
      const panel = panels[i];
      const nv = new Niivue({ ...OPTIONS });
      await nv.attachToCanvas(panel.canvas);
      nv.addColormap("msgldm_diff", DIFF_CMAP);
      nv.addColormap("msgldm_outline", OUTLINE_CMAP);
      nv.addColormap("msgldm_edges", EDGES_CMAP);
      panel.nv = nv;
      let image;
      if (s.diffOf) {
        image = difference(images[s.diffOf[0]], images[s.diffOf[1]]);
      } else {
        image = await NVImage.loadFromUrl({ url: s.name, name: s.name, buffer: s.bytes.slice(0), colormap: "gray" });
        images[s.id] = image;
      }
      image.colorbarVisible = false;
      nv.addVolume(image);  // uploads it (updateGLVolume)
      for (const o of s.overlays || []) {
        const look = OVERLAY_LOOK[o.kind];
        const overlay = await NVImage.loadFromUrl({ url: o.name, name: o.name, buffer: o.bytes.slice(0),
          colormap: look.colormap, opacity: look.opacity });
        if (look.range) [overlay.cal_min, overlay.cal_max] = look.range;
        else {  // below cal_min: transparent (the anatomy shows)
          overlay.cal_max = overlay.robust_max || overlay.global_max;
          overlay.cal_min = Math.max(overlay.robust_min, 0.35 * overlay.cal_max);
        }
        overlay.colorbarVisible = look.colorbar;
        nv.opts.isColorbar = nv.opts.isColorbar || look.colorbar;
        nv.addVolume(overlay);
        panel.overlays.push({ id: o.id, index: nv.volumes.length - 1, opacity: look.opacity, colorbar: look.colorbar });
      }
      panel.range = [nv.volumes[0].cal_min, nv.volumes[0].cal_max];
      nv.onLocationChange = () => this.follow(nv);
      nv.onIntensityChange = () => this.syncWindowInputs(panel);
      this.panels.push(panel);
      this.syncWindowInputs(panel);
    }
    this.setLayout(this.layout);
    this.follow(this.panels[0].nv);
    return this;
  }

  buildControls() {
    this.slider = h("input", { type: "range", id: "slice", min: 0, value: 0, "aria-label": "Slice",
      oninput: (e) => this.setSlice(Number(e.target.value)) });
    this.sliceLabel = h("span", { class: "mono", id: "slice-label", "aria-live": "polite" });
    this.layoutButtons = Object.keys(LAYOUTS).map((l) => h("button", { type: "button", "data-layout": l,
      "aria-pressed": String(l === this.layout), onclick: () => this.setLayout(l) }, l[0].toUpperCase() + l.slice(1)));
    return h("div", { class: "viewer-controls" },
      h("span", { class: "planes", role: "group", "aria-label": "Layout" }, this.layoutButtons),
      h("label", {}, "Slice ", this.slider), this.sliceLabel,
      h("label", {}, h("input", { type: "checkbox", id: "link-zoom", onchange: (e) => { this.linkZoom = e.target.checked; } }),
        " Link zoom"),
      h("button", { type: "button", onclick: () => this.resetAll() }, "Reset all W/L"),
      h("span", { class: "muted" }, HELP));
  }

  buildPanel(s) {
    const canvas = h("canvas", { "data-series": s.id, "aria-label": `${s.title} slice` });
    const stage = h("div", { class: "panel-stage" }, canvas,
      s.synthetic ? h("div", { class: "panel-banner", "data-banner": s.id }, BANNER) : null);
    stage.addEventListener("wheel", (e) => this.zoom(e, panel), { capture: true, passive: false });
    const panel = { id: s.id, title: s.title, canvas, synthetic: Boolean(s.synthetic), overlays: [] };
    const label = `${s.title}: `;
    panel.width = h("input", { type: "range", min: 2, max: 200, value: 100, "aria-label": `${label}window`,
      "data-window": s.id, oninput: () => this.applyWindow(panel) });
    panel.level = h("input", { type: "range", min: -50, max: 150, value: 50, "aria-label": `${label}level`,
      "data-level": s.id, oninput: () => this.applyWindow(panel) });
    const rows = [h("label", {}, "W ", panel.width), h("label", {}, "L ", panel.level),
      h("button", { type: "button", "data-reset": s.id, onclick: () => this.resetWindow(panel) }, "Reset")];
    for (const o of s.overlays || []) {  // data-overlay-*: "<panel>/<overlay>"
      const key = `${s.id}/${o.id}`;
      rows.push(h("label", {}, h("input", { type: "checkbox", checked: true, "data-overlay-toggle": key,
        onchange: (e) => this.setOverlay(panel, o.id, e.target.checked) }), ` ${o.title}`),
      h("label", {}, "opacity ", h("input", { type: "range", min: 0, max: 100, value: Math.round(100 * OVERLAY_LOOK[o.kind].opacity),
        "data-overlay-opacity": key, "aria-label": `${s.title}: ${o.title} opacity`,
        oninput: (e) => this.setOverlay(panel, o.id, true, Number(e.target.value) / 100) })));
    }
    panel.figure = h("figure", { class: `panel ${s.synthetic ? "synthetic" : ""}`, "data-panel": s.id, style: "margin:0" },
      h("h3", {}, s.title), stage, h("div", { class: "panel-controls" }, rows));
    return panel;
  }

  /** The crosshair of `src` (in mm) to every other panel; zoom and pan too when linked. */
  follow(src) {
    if (this.syncing) return;
    this.syncing = true;
    try {
      const mm = src.frac2mm(src.scene.crosshairPos);
      for (const p of this.panels) {
        if (p.nv === src) continue;
        p.nv.scene.crosshairPos = p.nv.mm2frac(mm);
        if (this.linkZoom) p.nv.scene.pan2Dxyzmm = [...src.scene.pan2Dxyzmm];
        p.nv.drawScene();
      }
    } finally {
      this.syncing = false;
    }
    this.drawSliceInputs();
  }

  zoom(e, panel) {  // Ctrl+wheel: zoom this panel (all of them with "Link zoom") about its centre
    if (!e.ctrlKey) return;
    e.preventDefault();
    e.stopPropagation();
    const pan = panel.nv.scene.pan2Dxyzmm;
    pan[3] = Math.min(8, Math.max(0.5, pan[3] * (e.deltaY < 0 ? 1.1 : 1 / 1.1)));
    panel.nv.drawScene();
    if (this.linkZoom) this.follow(panel.nv);
  }

  get nv() { return this.panels[0].nv; }

  /** Voxel of the crosshair on the first panel's RAS grid, and the grid's size (x, y, z). */
  get voxel() { return Array.from(this.nv.frac2vox(this.nv.scene.crosshairPos)).map(Math.round); }

  get dims() { return this.nv.volumes[0].dimsRAS.slice(1, 4); }

  get slice() { return this.voxel[LAYOUTS[this.layout].axis]; }

  /** For the tests and the console: the crosshair of each panel in mm (rounded to 0.01). */
  crosshairs() {
    return Object.fromEntries(this.panels.map((p) => [p.id,
      Array.from(p.nv.frac2mm(p.nv.scene.crosshairPos)).slice(0, 3).map((v) => Math.round(v * 100) / 100)]));
  }

  panel(id) { return this.panels.find((p) => p.id === id); }

  drawSliceInputs() {
    const axis = LAYOUTS[this.layout].axis;
    const n = this.dims[axis];
    this.slider.max = n - 1;
    this.slider.value = this.slice;
    const name = this.layout === "multiplanar" ? "axial" : this.layout;
    this.sliceLabel.textContent = `${name} ${this.slice + 1} / ${n}`;
  }

  setSlice(index) {
    const axis = LAYOUTS[this.layout].axis;
    const target = Math.max(0, Math.min(this.dims[axis] - 1, index));
    const delta = [0, 0, 0];
    delta[axis] = target - this.slice;
    if (delta[axis] !== 0) this.nv.moveCrosshairInVox(...delta);  // its location change moves the others
  }

  step(delta) { this.setSlice(this.slice + delta); }

  setLayout(layout) {
    this.layout = layout;
    this.layoutButtons.forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.layout === layout)));
    for (const p of this.panels) p.nv.setSliceType(LAYOUTS[layout].type);
    if (this.panels.length) this.drawSliceInputs();
  }

  key(e) {
    const steps = { ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10 };
    const layouts = Object.fromEntries(Object.entries(LAYOUTS).map(([k, v]) => [v.key, k]));
    if (e.target instanceof HTMLInputElement && e.target.type === "range") return;  // the sliders' own keys
    if (!this.panels.length) return;
    if (e.key in steps) this.step(steps[e.key]);
    else if (e.key === "Home") this.setSlice(0);
    else if (e.key === "End") this.setSlice(this.dims[LAYOUTS[this.layout].axis] - 1);
    else if (e.key.toLowerCase() in layouts && !e.ctrlKey && !e.metaKey && !e.altKey) this.setLayout(layouts[e.key.toLowerCase()]);
    else return;
    e.preventDefault();
    e.stopPropagation();
  }

  /** Window and level sliders in percent of the panel's reset range: level 50, window 100 = that range. */
  applyWindow(panel) {
    const [lo, hi] = panel.range;
    const span = hi - lo || 1;
    const centre = lo + (span * Number(panel.level.value)) / 100;
    const half = (span * Number(panel.width.value)) / 200;
    const vol = panel.nv.volumes[0];
    vol.cal_min = centre - half;
    vol.cal_max = centre + half;
    panel.nv.updateGLVolume();
  }

  syncWindowInputs(panel) {  // after a right-drag in NiiVue, show its window in the sliders
    if (!panel.range) return;
    const [lo, hi] = panel.range;
    const span = hi - lo || 1;
    const vol = panel.nv.volumes[0];
    panel.width.value = String(Math.round(((vol.cal_max - vol.cal_min) / span) * 100));
    panel.level.value = String(Math.round((((vol.cal_max + vol.cal_min) / 2 - lo) / span) * 100));
  }

  resetWindow(panel) {
    panel.width.value = "100";
    panel.level.value = "50";
    this.applyWindow(panel);
  }

  resetAll() { this.panels.forEach((p) => this.resetWindow(p)); }

  /** Show or hide one overlay of a panel (at `opacity`, remembered); its colour bar goes with it. */
  setOverlay(panel, overlayId, visible, opacity) {
    const o = panel.overlays.find((x) => x.id === overlayId);
    if (opacity !== undefined) o.opacity = opacity;
    const nv = panel.nv;
    if (o.colorbar) {
      nv.volumes[o.index].colorbarVisible = visible;
      nv.opts.isColorbar = visible;
    }
    const toggle = panel.figure.querySelector(`[data-overlay-toggle="${panel.id}/${overlayId}"]`);
    if (toggle.checked !== visible) toggle.checked = visible;
    nv.setOpacity(o.index, visible ? o.opacity : 0);
  }

  destroy() {
    for (const p of this.panels) {
      try { p.nv.gl?.getExtension("WEBGL_lose_context")?.loseContext(); } catch { /* already gone */ }
    }
  }
}
