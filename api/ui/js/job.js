// One job: status (live while it runs), downloads, validation metrics, the slice viewer and the quality report.
import { ApiError, api, download, fetchBlobUrl, fetchBytes } from "./api.js";
import { Poller, badge, fmt, h, progressBar, shortId, when, put } from "./dom.js";
import { Viewer } from "./viewer.js";

const ORDER = ["t1", "t2", "t1ce", "flair"];
const BANNER = "SYNTHETIC - not for primary diagnosis";

const OVERLAY_LABELS = { "brain_mask.outline": "Brain mask outline", "registration.edges": "Registration edges" };
const RANK = { synthesized: 0, uncertainty: 1, reference: 1, input: 1, overlay: 1, dicom: 2, preview: 3, report: 3,
  record: 3 };  // downloads: synthesized NIfTI first, then other NIfTI, DICOM, the job's own files

/** A download's label from what the result is (the job's result_kinds, api/core/results.py). */
function label(name, k) {
  const m = (k.modality || "").toUpperCase();
  return {
    synthesized: `${m} synthesized (NIfTI)`, uncertainty: `${m} uncertainty (NIfTI)`,
    reference: `${m} reference, normalised (NIfTI)`, input: `${m} input (NIfTI)`, dicom: `${m} synthesized (DICOM)`,
    overlay: `${OVERLAY_LABELS[k.overlay] || k.overlay} (NIfTI)`, report: "Report (HTML)", preview: "Preview (PNG)",
    record: "Record (JSON)",
  }[k.kind] || name;
}

/** The series to show: inputs, then per target synthesized and reference; the overlays of each (the uncertainty
 * on the synthesized panel; for a raw study the brain-mask outline on every panel and the registration edges on
 * the synthesized and reference panels). One overlay object per result, shared by the panels that show it. */
function seriesOf(job) {
  const base = `/api/v1/jobs/${job.id}`;
  const kinds = job.result_kinds;
  const url = (test) => {  // the URL of the result whose kind passes `test`, or undefined
    const name = Object.keys(kinds).find((n) => test(kinds[n]));
    return name && job.results[name];
  };
  const of = (kind, m) => url((k) => k.kind === kind && k.modality === m);
  const overlay = (u, kind, title) => (u ? { id: kind, kind, title, url: u } : null);  // kind: viewer.js OVERLAY_LOOK
  const raw = (name, kind) => overlay(url((k) => k.overlay === name), kind, OVERLAY_LABELS[name]);
  const outline = raw("brain_mask.outline", "outline");
  const edges = raw("registration.edges", "edges");
  const out = [];
  for (const m of ORDER.filter((x) => job.inputs.includes(x) && !job.targets.includes(x))) {
    out.push({ id: m, title: `${m.toUpperCase()} (input)`,  // a DICOM input's NIfTI, else the upload
      url: of("input", m) || `${base}/inputs/${m}`, overlays: [outline].filter(Boolean) });
  }
  for (const t of job.targets) {
    if (of("synthesized", t)) {
      const sd = overlay(of("uncertainty", t), "uncertainty", "uncertainty (SD)");
      out.push({ id: t, title: `${t.toUpperCase()} SYNTHETIC`, url: of("synthesized", t), synthetic: true,
        overlays: [sd, outline, edges].filter(Boolean) });
    }
    if (of("reference", t)) out.push({ id: `${t}.reference`, title: `${t.toUpperCase()} reference (acquired)`,
      url: of("reference", t), differenceOf: t, overlays: [outline, edges].filter(Boolean) });
  }
  return out;
}

/** A file name NiiVue reads the bytes by (an upload's URL has no extension): gzip or plain NIfTI. */
function niftiName(id, bytes) {
  const b = new Uint8Array(bytes, 0, 2);
  return `${id}.${b[0] === 0x1f && b[1] === 0x8b ? "nii.gz" : "nii"}`;
}

/** deliver_to (docs/pacs.md): where the DICOM result goes, and whether the node holds it (verified). */
function deliveriesTable(job) {
  if (!job.deliveries?.length) return null;
  return h("section", { "aria-label": "Deliveries" }, h("h2", {}, "Deliveries to PACS"),
    h("table", { class: "metrics", id: "deliveries" },
      h("tr", {}, h("th", {}, "node"), h("th", {}, "status"), h("th", {}, "attempts"), h("th", {}, "instances"),
        h("th", {}, "verified"), h("th", {}, "error")),
      job.deliveries.map((d) => h("tr", { "data-node": d.node }, h("td", { class: "mono" }, d.node),
        h("td", {}, badge(d.status)), h("td", {}, d.attempts), h("td", {}, d.instances ?? "–"),
        h("td", {}, when(d.verified_at)), h("td", { class: d.error ? "error" : "" }, d.error || "")))));
}

export function jobView(root, jobId) {
  const head = h("div");
  const downloads = h("section", { "aria-label": "Downloads" });
  const validation = h("section");
  const viewerBox = h("section", { id: "viewer-box" });
  const report = h("section");
  put(root, h("div", { class: "synthetic-banner", role: "alert" }, BANNER), head, validation, viewerBox,
    downloads, report);
  let loaded = false;
  let current = null;
  const urls = [];

  function drawHead(job) {
    const actions = [];
    if (["queued", "running"].includes(job.status)) {
      actions.push(h("button", { type: "button", class: "danger", onclick: async () => {
        await api(`/api/v1/jobs/${job.id}/cancel`, { method: "POST" }).catch((e) => alert(e.message));
        poller.fn();
      } }, "Cancel job"));
    }
    if (["failed", "cancelled"].includes(job.status)) {
      actions.push(h("button", { type: "button", onclick: async () => {
        await api(`/api/v1/jobs/${job.id}/retry`, { method: "POST" }).catch((e) => alert(e.message));
        poller.restart();
      } }, "Retry"));
    }
    const refs = job.targets.filter((t) => job.inputs.includes(t));
    const item = (k, v) => h("div", {}, h("span", {}, k), v);
    put(head,
      h("div", { class: "toolbar" }, h("h1", { style: "margin:0" }, `Job ${shortId(job.id)}`), badge(job.status),
        progressBar(job.progress, job.status), h("span", { id: "job-phase" }, `${job.progress}% · ${job.phase}`), ...actions,
        h("a", { href: "#/jobs" }, "← all jobs")),
      h("div", { class: "meta" },
        item("id", h("span", { class: "mono" }, job.id)),
        item("inputs", job.inputs.filter((m) => !refs.includes(m)).join(", ")),
        item("targets", job.targets.join(", ")),
        refs.length ? item("validation mode: reference", refs.join(", ")) : null,
        item("model", h("span", { class: "mono" }, job.model_version || "–")),
        item("seed", job.seed), item("steps", job.steps ?? "model default"), item("samples", job.samples),
        item("attempts", job.attempts), item("created", when(job.created_at)), item("finished", when(job.finished_at))),
      job.error ? h("p", { class: "error", role: "status" }, `${job.error.code}: ${job.error.message}`) : null,
      deliveriesTable(job),
      job.status === "queued" && job.queue_position !== null
        ? h("p", { class: "muted" }, `${job.queue_position} job(s) ahead in the queue`) : null);
  }

  function drawDownloads(job) {
    const kinds = job.result_kinds;
    const names = Object.keys(job.results).sort((a, b) => RANK[kinds[a].kind] - RANK[kinds[b].kind] || a.localeCompare(b));
    put(downloads, h("h2", {}, "Downloads"), h("div", { class: "downloads" }, names.map((name) =>
      h("button", { type: "button", "data-result": name, onclick: () => download(job.results[name], `${shortId(job.id)}-${name}`) },
        label(name, kinds[name])))));
  }

  /** The URL of the job's own file of `kind` (record, report, preview), from result_kinds. */
  const own = (job, kind) => job.results[Object.keys(job.result_kinds).find((n) => job.result_kinds[n].kind === kind)];

  async function drawRecord(job) {
    if (!own(job, "record")) return;
    const record = await api(own(job, "record"));
    const v = record.validation;
    if (v) {
      put(validation, h("h2", {}, "Validation against the uploaded (withheld) reference"),
        h("table", { class: "metrics", id: "validation-metrics" },
          h("tr", {}, h("th", {}, "target"), h("th", {}, "PSNR 2D (dB)"), h("th", {}, "SSIM 2D"), h("th", {}, "MAE"),
            h("th", {}, "PSNR 3D (dB)"), h("th", {}, "SSIM 3D")),
          // paper 2D protocol (absent for a raw study on its own grid) and BraSyn 3D: model/protocols.py
          Object.entries(v.metrics).map(([t, m]) => h("tr", {}, h("td", {}, t.toUpperCase()), h("td", {}, fmt(m.paper_psnr)),
            h("td", {}, fmt(m.paper_ssim, 4)), h("td", {}, fmt(m.mae, 4)), h("td", {}, fmt(m.brasyn_psnr)),
            h("td", {}, fmt(m.brasyn_ssim, 4))))),
        h("p", { class: "muted" }, v.protocol));
    }
    const timings = Object.entries(record.timings_seconds || {});
    const warnings = record.synthesis?.warnings || [];
    put(report, h("h2", {}, "Quality report"),
      warnings.length ? h("ul", { class: "notice" }, warnings.map((w) => h("li", {}, w))) : null,
      h("div", { class: "cols" },
        h("div", { id: "preview" }),
        h("div", {}, h("table", { class: "metrics" }, h("tr", {}, h("th", {}, "phase"), h("th", {}, "seconds")),
          timings.map(([k, s]) => h("tr", {}, h("td", {}, k), h("td", {}, fmt(s))))),
        own(job, "report") ? h("button", { type: "button", onclick: async () => {
          const url = await fetchBlobUrl(own(job, "report"));
          urls.push(url);
          window.open(url, "_blank", "noopener");
        } }, "Open report.html") : null)));
    if (own(job, "preview")) {
      const url = await fetchBlobUrl(own(job, "preview"));
      urls.push(url);
      report.querySelector("#preview").append(h("img", { class: "report-img", src: url,
        alt: "Montage: inputs, synthesized, uncertainty in three orthogonal planes" }));
    }
  }

  async function loadViewer(job) {
    const series = seriesOf(job);
    const status = h("p", { class: "muted", id: "viewer-status", "aria-live": "polite" }, "Loading volumes…");
    put(viewerBox, h("h2", {}, "Viewer"), status);
    const files = [...new Set(series.flatMap((s) => [s, ...s.overlays]))];
    for (const [i, s] of files.entries()) {  // with the key in a header; NiiVue gets the bytes, never a URL
      s.bytes = await fetchBytes(s.url, (n, total) => {
        status.textContent = `Loading ${s.title} (${i + 1}/${files.length}): ${(n / 1e6).toFixed(1)}`
          + `${total ? ` / ${(total / 1e6).toFixed(1)}` : ""} MB`;
      });
      s.name = niftiName(s.id, s.bytes);
    }
    const viewer = new Viewer(series);
    viewerBox.append(viewer.element);
    await viewer.load((text) => { status.textContent = text; });
    const [x, y, z] = viewer.dims;
    status.textContent = `${viewer.panels.length} panels on a ${x}×${y}×${z} grid`;
    window.msgldmViewer = viewer;  // for the browser tests and the console
    current = viewer;
  }

  const poller = new Poller(async () => {
    let job;
    try {
      job = await api(`/api/v1/jobs/${jobId}`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        put(head, h("h1", {}, "Job not found"), h("p", { class: "error" }, e.message));
        poller.stop();
        return;
      }
      throw e;
    }
    drawHead(job);
    drawDownloads(job);
    const delivering = (job.deliveries || []).some((d) => d.status === "pending");  // kept live until they end
    if (job.status === "succeeded" && !loaded) {
      loaded = true;
      if (!delivering) poller.stop();
      await drawRecord(job).catch((e) => put(report, h("p", { class: "error" }, `report: ${e.message}`)));
      await loadViewer(job).catch((e) => put(viewerBox, h("p", { class: "error" }, `viewer: ${e.message}`)));
    } else if (["failed", "cancelled"].includes(job.status) || (loaded && !delivering)) {
      poller.stop();
    }
  }, 2000);
  poller.restart = () => { poller.stopped = false; poller.start(); };
  poller.start();
  return () => { poller.stop(); urls.forEach((u) => URL.revokeObjectURL(u)); current?.destroy();
    delete window.msgldmViewer; };
}
